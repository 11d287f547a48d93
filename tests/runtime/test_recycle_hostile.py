"""A recycled runtime remembers nothing of its last owner, compared with one that never had one.

The previous owner changes what it may on its places themselves (not only their content):
extended attributes, access and default ACLs, modes; it leaves System V IPC objects and
processes that left its session. The next owner's view must equal a fresh runtime's view.
"""

from __future__ import annotations

import pytest

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import Sandbox
from tests.runtime.pooltools import event_reasons

pytestmark = pytest.mark.anyio

# Everything an owner may change that the next one could see, printed the same way each time.
LOOK = r"""
python3 - <<'PY'
import os, stat
for place in ("/workspace", os.path.expanduser("~"), "/tmp", "/dev/shm"):
    st = os.lstat(place)
    print(place, oct(stat.S_IMODE(st.st_mode)), st.st_uid, st.st_gid,
          sorted(os.listxattr(place)), sorted(os.listdir(place)))
PY
echo ipc: $(ipcs -q -s -m | grep -c '^0x'); echo umask: $(umask)
ps -eo user=,args= | grep -v -e 'ps -eo' -e grep -e docker-init -e supervisor.py -e 'bash -c' -e python3 || true
command -v crontab at atd batch || echo no-cron-or-at
"""

# The previous owner: attributes and ACLs on /workspace and its home, opened modes, IPC
# objects, a daemon that left its session.
LITTER = r"""
set -e
python3 - <<'PY'
import os, struct
def acl(*entries):
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, who) for tag, perm, who in entries)
ANY = 0xFFFFFFFF
home = os.path.expanduser("~")
for place in ("/workspace", home):
    os.setxattr(place, "user.left-by", b"previous owner")
os.setxattr("/workspace", "system.posix_acl_access",
            acl((1, 7, ANY), (2, 7, 1001), (4, 7, ANY), (0x10, 7, ANY), (0x20, 7, ANY)))
os.setxattr(home, "system.posix_acl_default", acl((1, 7, ANY), (4, 7, ANY), (0x20, 7, ANY)))
os.chmod("/workspace", 0o777)
os.chmod(home, 0o755)
PY
ipcmk -Q >/dev/null; ipcmk -S 2 >/dev/null; ipcmk -M 4096 >/dev/null
setsid nohup sleep 1000 >/dev/null 2>&1 &
echo littered
"""


def who(workspace: str) -> Identity:
    return Identity(workspace_id=workspace, project_id="p", user_id=f"user-{workspace}")


async def test_a_recycled_runtime_looks_exactly_like_a_fresh_one_to_its_next_owner(pool_settings) -> None:
    """Max 2 with one fresh sandbox held: the next claim can only get the littered runtime back."""
    settings = pool_settings(default_pool={"min": 2, "max": 2})
    async with Engine.open(settings) as engine:
        fresh = await engine.sandboxes.create(who("f"))
        fresh_view = (await engine.sandboxes.exec(who("f"), fresh.sandbox_id, LOOK)).stdout

        first = await engine.sandboxes.create(who("a"))
        littered = await engine.sandboxes.exec(who("a"), first.sandbox_id, LITTER)
        assert littered.stdout == "littered\n", littered  # the attack itself worked
        seen_by_owner = (await engine.sandboxes.exec(who("a"), first.sandbox_id, LOOK)).stdout
        assert "user.left-by" in seen_by_owner and "system.posix_acl_access" in seen_by_owner
        runtime_id = (await engine.store.get(Sandbox, first.sandbox_id)).runtime_id
        await engine.sandboxes.destroy(who("a"), first.sandbox_id)

        second = await engine.sandboxes.create(who("b"))
        assert (await engine.store.get(Sandbox, second.sandbox_id)).runtime_id == runtime_id  # the same container
        assert (await engine.sandboxes.exec(who("b"), second.sandbox_id, LOOK)).stdout == fresh_view
        assert "/workspace 0o2775 1000 1000 [] []" in fresh_view and "ipc: 0" in fresh_view
        assert "no-cron-or-at" in fresh_view
        assert "recycled: wiped and verified clean" in await event_reasons(engine, runtime_id)


async def test_what_a_member_user_changes_on_the_places_is_found_by_the_check_and_undone(pool_settings) -> None:
    """A member shares /workspace through its group, so it can set attributes there too."""
    settings = pool_settings(default_pool={"min": 1, "max": 1})
    mark = (
        "python3 -c \"import os; h = os.path.expanduser('~'); "
        "[os.setxattr(p, 'user.left-by', b'm1') for p in ('/workspace', h)]; os.chmod(h, 0o711)\""
    )
    async with Engine.open(settings) as engine:
        first = await engine.sandboxes.create(who("a"))
        fresh_home = (await engine.sandboxes.exec(who("a"), first.sandbox_id, LOOK, run_as="m1")).stdout
        assert (await engine.sandboxes.exec(who("a"), first.sandbox_id, mark, run_as="m1")).exit_code == 0
        row = await engine.store.get(Sandbox, first.sandbox_id)
        found = " ".join(await engine.provisioner.leftovers(row.container_id, row.runtime_id, "default"))
        assert "/workspace is not as fresh" in found and "/home/m1 is not as fresh" in found, found
        await engine.sandboxes.destroy(who("a"), first.sandbox_id)

        second = await engine.sandboxes.create(who("b"))
        assert (await engine.store.get(Sandbox, second.sandbox_id)).runtime_id == row.runtime_id
        assert (await engine.sandboxes.exec(who("b"), second.sandbox_id, LOOK, run_as="m1")).stdout == fresh_home
        assert "recycled: wiped and verified clean" in await event_reasons(engine, row.runtime_id)
