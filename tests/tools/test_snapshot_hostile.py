"""No workspace is lost by dockyard's own hand: large snapshots, failed snapshots, outside pauses.

The health loop runs every 0.2 s here, so it looks at a sandbox many times while a snapshot
holds it paused, and while someone outside dockyard pauses it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import docker
import pytest
from mcp import Client
from sqlmodel import Session, create_engine, select

from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import PoolEvent
from dockyard.server.app import build_server
from tests.conftest import call, call_error, make_settings, remove_instance, sandbox_row, sh

pytestmark = pytest.mark.anyio

MIB = 1 << 20


@pytest.fixture
def watched(tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient) -> Iterator[Settings]:
    settings = make_settings(
        tmp_path / "data", pool={"health_interval_s": 0.2}, sandbox={"snapshot_max_bytes": 64 * MIB}
    )
    yield settings
    remove_instance(docker_client, settings)


@pytest.fixture
async def client(watched: Settings) -> AsyncIterator[Client]:
    async with Client(build_server(watched)) as connected:
        yield connected


async def fill(client: Client, sandbox_id: str, mib: int) -> None:
    ran = await sh(
        client,
        sandbox_id,
        f"head -c {mib}M /dev/urandom > /workspace/big.bin && echo kept > /workspace/marker",
        timeout_s=120,
    )
    assert ran["exit_code"] == 0, ran


def snapshot_folders(settings: Settings) -> list[str]:
    return sorted(p.name for p in settings.snapshots_dir.glob("snp_*")) if settings.snapshots_dir.is_dir() else []


async def test_a_snapshot_of_a_large_workspace_succeeds_and_the_sandbox_runs_on(
    client: Client, watched: Settings
) -> None:
    """The pause a snapshot needs is dockyard's own: the health loop must not call it a stop."""
    sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
    await fill(client, sandbox_id, 60)
    snap = await call(client, "sandbox_snapshot", sandbox_id=sandbox_id, label="large")
    assert snap["size_bytes"] > 60 * MIB
    await anyio.sleep(0.5)  # more health checks after the pause
    assert (await sh(client, sandbox_id, "cat /workspace/marker"))["stdout"] == "kept\n"
    assert sandbox_row(watched, sandbox_id).status == "running"
    restored = (await call(client, "sandbox_create", from_snapshot=snap["snapshot_id"]))["sandbox_id"]
    assert (await sh(client, restored, "cat /workspace/marker; stat -c %s /workspace/big.bin"))[
        "stdout"
    ] == f"kept\n{60 * MIB}\n"


async def test_a_snapshot_over_its_size_limit_fails_clearly_leaves_no_file_and_the_sandbox_runs_on(
    client: Client, watched: Settings
) -> None:
    sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
    await fill(client, sandbox_id, 80)
    message = await call_error(client, "sandbox_snapshot", sandbox_id=sandbox_id)
    assert "over its limit" in message and "snapshot_max_bytes" in message
    assert snapshot_folders(watched) == []
    assert (await sh(client, sandbox_id, "cat /workspace/marker"))["stdout"] == "kept\n"
    assert sandbox_row(watched, sandbox_id).status == "running"


async def test_a_pause_from_outside_is_reported_not_destroyed_and_unpausing_resumes_the_sandbox(
    client: Client, watched: Settings, docker_client: docker.DockerClient
) -> None:
    sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
    await sh(client, sandbox_id, "echo kept > /workspace/marker")
    row = sandbox_row(watched, sandbox_id)
    container = docker_client.containers.get(row.container_id)
    container.pause()
    try:
        await anyio.sleep(1.5)  # several health checks see it paused
        assert sandbox_row(watched, sandbox_id).status == "running"
        with Session(create_engine(f"sqlite:///{watched.store_path}")) as session:
            events = session.exec(select(PoolEvent).where(PoolEvent.runtime_id == row.runtime_id)).all()
        noted = [e.reason for e in events if "paused outside dockyard" in e.reason]
        assert len(noted) == 1, [e.reason for e in events]  # reported once, not at every check
        with anyio.fail_after(5):  # said at once, not after the command's timeout
            message = await call_error(client, "sandbox_exec", sandbox_id=sandbox_id, command="true", timeout_s=60)
            read = await call_error(client, "sandbox_read_file", sandbox_id=sandbox_id, path="marker")
        assert "paused outside dockyard" in message and "unpause" in message and "sandbox_destroy" in message
        assert "paused outside dockyard" in read
    finally:
        container.unpause()
    with anyio.fail_after(10):  # the unpause event clears the mark
        while True:
            ran = await client.call_tool("sandbox_exec", {"sandbox_id": sandbox_id, "command": "cat /workspace/marker"})
            if not ran.is_error:
                break
            await anyio.sleep(0.1)
    assert (await sh(client, sandbox_id, "cat /workspace/marker"))["stdout"] == "kept\n"


async def test_a_paused_sandbox_can_still_be_destroyed(
    client: Client, watched: Settings, docker_client: docker.DockerClient
) -> None:
    sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
    row = sandbox_row(watched, sandbox_id)
    docker_client.containers.get(row.container_id).pause()
    await anyio.sleep(0.5)
    await call(client, "sandbox_destroy", sandbox_id=sandbox_id)
    assert sandbox_row(watched, sandbox_id).status == "destroyed"
    with anyio.fail_after(20):  # removed, not wiped for the next owner: a frozen one cannot be
        while row.container_id in {c.id for c in docker_client.containers.list(all=True)}:
            await anyio.sleep(0.2)


async def test_a_kill_from_outside_marks_the_sandbox_lost_with_a_clear_message(
    client: Client, watched: Settings, docker_client: docker.DockerClient
) -> None:
    sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
    docker_client.containers.get(sandbox_row(watched, sandbox_id).container_id).kill()
    with anyio.fail_after(20):
        while sandbox_row(watched, sandbox_id).status != "lost":
            await anyio.sleep(0.1)
    message = await call_error(client, "sandbox_exec", sandbox_id=sandbox_id, command="true")
    assert "was lost" in message and "outside dockyard" in message and "sandbox_create" in message


# -- a workspace's snapshots share one quota ------------------------------------------------------


@pytest.fixture
def quota_settings(tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient) -> Iterator[Settings]:
    settings = make_settings(
        tmp_path / "data", quotas={"workspace_snapshot_mb": 24}, sandbox={"snapshot_max_bytes": 64 * MIB}
    )
    yield settings
    remove_instance(docker_client, settings)


def snapshot_bytes(settings: Settings) -> int:
    return (
        sum(f.stat().st_size for f in settings.snapshots_dir.rglob("*") if f.is_file())
        if settings.snapshots_dir.is_dir()
        else 0
    )


async def test_snapshots_past_the_workspace_quota_stop_leave_nothing_and_deleting_one_gives_its_room_back(
    quota_settings: Settings,
) -> None:
    """A tenant that snapshots again and again fills at most its workspace's share of the host's disk."""
    async with Client(build_server(quota_settings)) as client:
        sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
        await fill(client, sandbox_id, 10)
        first = await call(client, "sandbox_snapshot", sandbox_id=sandbox_id)
        second = await call(client, "sandbox_snapshot", sandbox_id=sandbox_id)
        held = snapshot_bytes(quota_settings)
        assert 20 * MIB < held <= 24 * MIB
        # The third would pass 24 MiB: it stops mid-way, and nothing of it stays on disk.
        message = await call_error(client, "sandbox_snapshot", sandbox_id=sandbox_id)
        assert "workspace_snapshot_mb" in message and "snapshot_delete" in message and "nothing was saved" in message
        assert snapshot_bytes(quota_settings) == held
        assert snapshot_folders(quota_settings) == sorted([first["snapshot_id"], second["snapshot_id"]])
        assert (await sh(client, sandbox_id, "cat /workspace/marker"))["stdout"] == "kept\n"
        assert sandbox_row(quota_settings, sandbox_id).status == "running"
        # A small snapshot still fits in what is left.
        await sh(client, sandbox_id, "rm /workspace/big.bin")
        small = await call(client, "sandbox_snapshot", sandbox_id=sandbox_id)
        # Deleting a snapshot gives its room back, and it can no longer be restored.
        deleted = await call(client, "snapshot_delete", snapshot_id=first["snapshot_id"])
        assert deleted == {"snapshot_id": first["snapshot_id"], "deleted": True}
        assert first["snapshot_id"] not in snapshot_folders(quota_settings)
        assert "unknown snapshot" in await call_error(client, "sandbox_create", from_snapshot=first["snapshot_id"])
        assert "unknown snapshot" in await call_error(client, "snapshot_delete", snapshot_id=first["snapshot_id"])
        await fill(client, sandbox_id, 10)
        await call(client, "sandbox_snapshot", sandbox_id=sandbox_id)
        restored = (await call(client, "sandbox_create", from_snapshot=small["snapshot_id"]))["sandbox_id"]
        assert (await sh(client, restored, "cat /workspace/marker; ls /workspace"))["stdout"] == "kept\nmarker\n"


async def test_concurrent_snapshots_of_one_workspace_cannot_together_pass_its_quota(quota_settings: Settings) -> None:
    """Each snapshot alone fits in the room left; all of them at once would not."""
    async with Client(build_server(quota_settings)) as client:
        sandboxes = [(await call(client, "sandbox_create"))["sandbox_id"] for _ in range(3)]
        for sandbox_id in sandboxes:
            await fill(client, sandbox_id, 10)
        outcomes: list[bool] = []

        async def snapshot(sandbox_id: str) -> None:
            result = await client.call_tool("sandbox_snapshot", {"sandbox_id": sandbox_id})
            outcomes.append(not result.is_error)

        async with anyio.create_task_group() as tg:
            for sandbox_id in sandboxes:
                tg.start_soon(snapshot, sandbox_id)
        assert sorted(outcomes) == [False, True, True]
        assert snapshot_bytes(quota_settings) <= 24 * MIB
        assert len(snapshot_folders(quota_settings)) == 2
