"""A stdio server that ends, as a client ends it: its stdin closed, or SIGTERM. Warm runtimes
stop with it (nothing idles on the host once the client is gone) unless
`pool.keep_warm_after_exit` says otherwise; claimed sandboxes stay with their owner; and a
sandbox that expired while no server ran is removed as the next one starts."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import anyio
import docker
import pytest
from mcp import Client, StdioServerParameters
from sqlmodel import Session, col, create_engine, select

from dockyard.runtime.substrate.store import Runtime, RuntimeState, Sandbox
from tests.conftest import call, make_settings, remove_instance, sh

pytestmark = pytest.mark.anyio

BIN = Path(sys.executable).parent
POOL = {"POOL_MIN": "2", "POOL_MAX": "4", "DOCKYARD_TEMPLATES__COMPUTER__POOL__MIN": "0"}


@pytest.fixture
def data_dir(tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient):
    path = tmp_path / "data"
    yield path
    remove_instance(docker_client, make_settings(path))


def environment(data_dir: Path, **extra: str) -> dict[str, str]:
    # pool_status is an admin tool: this server offers that toolset too
    toolsets = '["sandbox", "dispatch", "admin"]'
    return {
        "DOCKYARD_DATA_DIR": str(data_dir),
        "PATH": "/usr/bin:/bin",
        "DOCKYARD_TOOLSETS__STDIO": toolsets,
        **POOL,
        **extra,
    }


def server(data_dir: Path, pid_file: Path, **extra: str) -> Client:
    """`dockyard serve` through a shell that records its pid, then becomes the server."""
    script = f'echo $$ > "{pid_file}"; exec "{BIN / "dockyard"}" serve'
    return Client(StdioServerParameters(command="/bin/sh", args=["-c", script], env=environment(data_dir, **extra)))


async def settled(client: Client, warm: int) -> None:
    with anyio.fail_after(90):
        while True:
            (default,) = [p for p in (await call(client, "pool_status"))["pools"] if p["template"] == "default"]
            if default["warm"] == warm and default["provisioning"] == 0 and default["draining"] == 0:
                return
            await anyio.sleep(0.1)


def runtimes(data_dir: Path) -> dict[str, str]:
    """{runtime id: state} of every runtime the store still counts as live."""
    with Session(create_engine(f"sqlite:///{data_dir / 'dockyard.db'}")) as session:
        rows = session.exec(select(Runtime).where(col(Runtime.state).in_(RuntimeState.LIVE))).all()
        return {row.id: row.state for row in rows}


def containers(client: docker.DockerClient, data_dir: Path) -> set[str]:
    instance = (data_dir / "instance-id").read_text().strip()
    found = client.containers.list(all=True, sparse=True, filters={"label": f"dockyard.instance={instance}"})
    return {c.id for c in found}


def container_of(data_dir: Path, sandbox_id: str) -> str | None:
    with Session(create_engine(f"sqlite:///{data_dir / 'dockyard.db'}")) as session:
        sandbox = session.get(Sandbox, sandbox_id)
        assert sandbox is not None
        return sandbox.container_id


def wait_gone(pid: int, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server (pid {pid}) still runs {within_s}s after it was told to stop")


async def test_closing_stdin_stops_the_warm_runtimes_and_keeps_the_claimed_sandbox(
    data_dir: Path, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    pid_file = tmp_path / "server.pid"
    async with server(data_dir, pid_file) as client:
        await settled(client, warm=2)
        sid = (await call(client, "sandbox_create"))["sandbox_id"]
        await sh(client, sid, "echo kept > note.txt")
        await settled(client, warm=2)
        assert len(containers(docker_client, data_dir)) == 3
    # The client closed stdin, waited, and would have killed a server that lingered.
    wait_gone(int(pid_file.read_text()), 10)
    assert sorted(runtimes(data_dir).values()) == ["claimed"]
    assert containers(docker_client, data_dir) == {container_of(data_dir, sid)}

    async with server(data_dir, pid_file) as client:  # the claimed sandbox is adopted, its work intact
        assert (await sh(client, sid, "cat note.txt"))["stdout"] == "kept\n"
        await settled(client, warm=2)


async def test_sigterm_stops_the_server_cleanly_and_its_warm_runtimes_with_it(
    data_dir: Path, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    pid_file = tmp_path / "server.pid"
    try:
        async with server(data_dir, pid_file) as client:
            await settled(client, warm=2)
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
            await anyio.to_thread.run_sync(wait_gone, pid, 15)
    except Exception:  # noqa: BLE001 - the client sees its server go; that is the point
        pass
    assert runtimes(data_dir) == {}
    assert containers(docker_client, data_dir) == set()


async def test_keep_warm_after_exit_leaves_the_pool_warm_for_the_next_start(
    data_dir: Path, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    pid_file = tmp_path / "server.pid"
    keep = {"DOCKYARD_POOL__KEEP_WARM_AFTER_EXIT": "true"}
    async with server(data_dir, pid_file, **keep) as client:
        await settled(client, warm=2)
    wait_gone(int(pid_file.read_text()), 10)
    warm = runtimes(data_dir)
    assert sorted(warm.values()) == ["warm", "warm"]
    assert len(containers(docker_client, data_dir)) == 2
    async with server(data_dir, pid_file, **keep) as client:  # adopted, not started again
        await settled(client, warm=2)
        assert set(runtimes(data_dir)) == set(warm)


async def test_a_sandbox_that_expired_while_no_server_ran_is_removed_as_the_next_starts(
    data_dir: Path, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    pid_file = tmp_path / "server.pid"
    try:
        async with server(data_dir, pid_file) as client:
            sid = (await call(client, "sandbox_create", ttl_s=2))["sandbox_id"]
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # no expiry sweep can run now
            await anyio.sleep(0.5)
    except Exception:  # noqa: BLE001 - the client sees its server vanish; that is the point
        pass
    container = container_of(data_dir, sid)
    assert container in containers(docker_client, data_dir)
    await anyio.sleep(2.5)  # expired meanwhile
    # A sweep interval of an hour: only the sweep at start can remove it.
    async with server(data_dir, pid_file, DOCKYARD_SANDBOX__REAPER_INTERVAL_S="3600") as client:
        with anyio.fail_after(30):
            while container in containers(docker_client, data_dir):
                await anyio.sleep(0.2)
        listed = await call(client, "sandbox_list")
        assert sid not in [s["sandbox_id"] for s in listed["sandboxes"]]
