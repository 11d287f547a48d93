"""The sandbox's member users (m1..m16): commands and files as one of them, and a pool that
wipes what they leave (their processes, private files and homes) before the next owner."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.errors import DockyardError
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import Sandbox
from tests.conftest import make_settings, remove_instance
from tests.runtime.pooltools import event_reasons

pytestmark = pytest.mark.anyio


def who(workspace: str) -> Identity:
    return Identity(workspace_id=workspace, project_id="p", user_id=f"user-{workspace}")


async def test_a_member_user_runs_with_its_own_home_and_the_shared_group_and_never_as_root(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    settings = make_settings(tmp_path / "data", default_pool={"min": 0, "max": 1})
    try:
        async with Engine.open(settings) as engine:
            box = await engine.sandboxes.create(who("a"))
            look = (
                "id -un; id -gn; echo $HOME; umask; stat -c %a $HOME; touch /workspace/f; stat -c %U:%G:%a /workspace/f"
            )
            seen = await engine.sandboxes.exec(who("a"), box.sandbox_id, look, run_as="m3")
            assert seen.stdout.split() == ["m3", "agent", "/home/m3", "0002", "700", "m3:agent:664"], seen
            for user in ("root", "nobody", "../agent"):
                with pytest.raises(DockyardError, match="no sandbox user"):
                    await engine.sandboxes.exec(who("a"), box.sandbox_id, "id", run_as=user)
    finally:
        remove_instance(docker_client, settings)


async def test_what_member_users_leave_is_wiped_before_the_next_owner(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    """Max 1 forces the next claim onto the very same container after it is wiped."""
    settings = make_settings(tmp_path / "data", default_pool={"min": 1, "max": 1})
    litter = {
        "m1": "mkdir -m 700 /workspace/m1-private && echo s > /workspace/m1-private/f; mkdir -m 700 /tmp/m1-dir; "
        "echo t > /tmp/m1-dir/f; echo h > ~/left; mkdir /workspace/open; "
        "setsid nohup sleep 1000 >/dev/null 2>&1 &",
        "m2": "mkdir -m 700 /workspace/open/m2-inside && echo s > /workspace/open/m2-inside/f; echo t > /dev/shm/m2; "
        "chmod 700 ~; echo 'export STOLEN=1' >> ~/.bashrc; setsid nohup sleep 1001 >/dev/null 2>&1 &",
    }
    try:
        async with Engine.open(settings) as engine:
            first = await engine.sandboxes.create(who("a"))
            for user, script in litter.items():
                ran = await engine.sandboxes.exec(who("a"), first.sandbox_id, script, run_as=user)
                assert ran.exit_code == 0, ran
            row = await engine.store.get(Sandbox, first.sandbox_id)
            runtime_id = row.runtime_id
            found = " ".join(await engine.provisioner.leftovers(row.container_id, runtime_id, "default"))
            assert "/home/m1/left" in found and "/home/m2/.bashrc" in found and "sleep 1001" in found, found
            await engine.sandboxes.destroy(who("a"), first.sandbox_id)

            second = await engine.sandboxes.create(who("b"))
            assert (await engine.store.get(Sandbox, second.sandbox_id)).runtime_id == runtime_id  # the same container
            assert "recycled: wiped and verified clean" in await event_reasons(engine, runtime_id)
            seen = await engine.sandboxes.exec(
                who("b"), second.sandbox_id, "ls -A /workspace /tmp /dev/shm; ps -eo user=,args="
            )
            assert "m1" not in seen.stdout and "m2" not in seen.stdout and "open" not in seen.stdout, seen.stdout
            for user in litter:
                home = await engine.sandboxes.exec(
                    who("b"), second.sandbox_id, "ls -A ~; cmp ~/.bashrc /etc/skel/.bashrc && echo fresh", run_as=user
                )
                assert home.stdout.split() == [".bash_logout", ".bashrc", ".profile", "fresh"], home
    finally:
        remove_instance(docker_client, settings)
