"""A workspace is the security boundary: another workspace sees none of its sandboxes."""

from __future__ import annotations

import pytest

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.errors import SandboxNotFoundError
from dockyard.runtime.substrate.settings import Identity

pytestmark = pytest.mark.anyio

ALICE = Identity(workspace_id="ws-alice", user_id="alice")
BOB = Identity(workspace_id="ws-bob", user_id="bob")

PROBE = """
import sys, time, urllib.request
for _ in range(int(sys.argv[2])):
    try:
        print(urllib.request.urlopen(f"http://{sys.argv[1]}:8080/", timeout=1).status); break
    except OSError:
        time.sleep(0.2)
else:
    print("unreachable")
"""


async def test_another_workspace_cannot_see_or_touch_a_sandbox(engine: Engine) -> None:
    box = await engine.sandboxes.create(ALICE)
    assert await engine.sandboxes.list(BOB) == []
    for attempt in (
        engine.sandboxes.exec(BOB, box.sandbox_id, "true"),
        engine.sandboxes.read_file(BOB, box.sandbox_id, "x", None, None),
        engine.snapshots.take(BOB, box.sandbox_id, None),
        engine.sandboxes.destroy(BOB, box.sandbox_id),
    ):
        with pytest.raises(SandboxNotFoundError):
            await attempt
    assert [s.sandbox_id for s in await engine.sandboxes.list(ALICE)] == [box.sandbox_id]
    snap = await engine.snapshots.take(ALICE, box.sandbox_id, None)
    with pytest.raises(Exception, match="unknown snapshot"):
        await engine.sandboxes.create(BOB, from_snapshot=snap.snapshot_id)


async def test_workspace_networks_connect_a_workspace_and_isolate_it_from_others(engine: Engine) -> None:
    server = await engine.sandboxes.create(ALICE, network="workspace")
    await engine.sandboxes.exec(ALICE, server.sandbox_id, "nohup python3 -m http.server 8080 > /tmp/log 2>&1 &")
    address = (await engine.sandboxes.exec(ALICE, server.sandbox_id, "hostname -i")).stdout.split()[0]
    friend = await engine.sandboxes.create(ALICE, network="workspace")
    stranger = await engine.sandboxes.create(BOB, network="workspace")

    seen = await engine.sandboxes.exec(ALICE, friend.sandbox_id, f"python3 - {address} 50", stdin=PROBE)
    assert seen.stdout.strip() == "200"
    blocked = await engine.sandboxes.exec(BOB, stranger.sandbox_id, f"python3 - {address} 3", stdin=PROBE)
    assert blocked.stdout.strip() == "unreachable"
