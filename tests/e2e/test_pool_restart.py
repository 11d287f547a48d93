"""`kill -9` of a real `dockyard serve` with a warm pool, then a restart: claimed sandboxes stay
with their owner, the pool is whole again, and no container is left that the store does not
account for. `dockyard pool status` reads the same figures from the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from mcp import Client, StdioServerParameters
from sqlmodel import Session, col, create_engine, select

from dockyard.runtime.substrate.store import Runtime, RuntimeState, Sandbox
from tests.conftest import call, make_settings, remove_instance, sh

pytestmark = pytest.mark.anyio

BIN = Path(sys.executable).parent
# No warm computer: these tests count sandboxes, and a browser would only slow them.
TOOLSETS = json.dumps(
    ["sandbox", "computer", "dispatch", "team", "admin"]
)  # these tests read pools, dispatch, lead teams
POOL = {"POOL_MIN": "3", "POOL_MAX": "6", "DOCKYARD_TEMPLATES__COMPUTER__POOL__MIN": "0"}


@pytest.fixture
def data_dir(tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient):
    path = tmp_path / "data"
    yield path
    remove_instance(docker_client, make_settings(path))


def environment(data_dir: Path) -> dict[str, str]:
    return {"DOCKYARD_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin", "DOCKYARD_TOOLSETS__STDIO": TOOLSETS, **POOL}


def killable(data_dir: Path, pid_file: Path) -> Client:
    """`dockyard serve` started through a shell that records its pid, then becomes the server."""
    script = f'echo $$ > "{pid_file}"; exec "{BIN / "dockyard"}" serve'
    return Client(StdioServerParameters(command="/bin/sh", args=["-c", script], env=environment(data_dir)))


async def pool(client: Client) -> dict[str, Any]:
    """The sandbox pool's figures (the computer pool is listed too)."""
    (default,) = [p for p in (await call(client, "pool_status"))["pools"] if p["template"] == "default"]
    return default


async def settled(client: Client, warm: int) -> dict[str, Any]:
    with anyio.fail_after(90):
        while True:
            info = await pool(client)
            if info["warm"] == warm and info["provisioning"] == 0 and info["draining"] == 0:
                return info
            await anyio.sleep(0.1)


def live_runtimes(data_dir: Path) -> list[Runtime]:
    with Session(create_engine(f"sqlite:///{data_dir / 'dockyard.db'}")) as session:
        return list(session.exec(select(Runtime).where(col(Runtime.state).in_(RuntimeState.LIVE))).all())


def labelled_containers(client: docker.DockerClient, data_dir: Path) -> set[str]:
    instance = (data_dir / "instance-id").read_text().strip()
    return {
        c.id for c in client.containers.list(all=True, sparse=True, filters={"label": f"dockyard.instance={instance}"})
    }


async def test_kill_9_and_restart_keeps_claims_restores_the_pool_and_leaks_nothing(
    data_dir: Path, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    pid_file = tmp_path / "server.pid"
    try:
        async with killable(data_dir, pid_file) as client:
            await settled(client, warm=3)
            sid = (await call(client, "sandbox_create"))["sandbox_id"]
            await sh(client, sid, "echo survived > note.txt")
            await call(client, "sandbox_create")  # a second claim: the pool is refilling as the server dies
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            await anyio.sleep(0.5)
    except Exception:  # noqa: BLE001 - the client sees its server vanish; that is the point
        pass

    async with Client(
        StdioServerParameters(command=str(BIN / "dockyard"), args=["serve"], env=environment(data_dir))
    ) as client:
        assert (await sh(client, sid, "cat note.txt"))["stdout"] == "survived\n"
        info = await settled(client, warm=3)
        assert info["claimed"] == 2
        live = live_runtimes(data_dir)
        assert sorted(r.state for r in live) == ["claimed", "claimed", "warm", "warm", "warm"]
        assert labelled_containers(docker_client, data_dir) == {r.container_id for r in live}

    shown = subprocess.run(
        [str(BIN / "dockyard"), "pool", "status", "--json"], env=environment(data_dir), capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr
    (default,) = [p for p in json.loads(shown.stdout) if p["template"] == "default"]
    # The server exited gracefully when its client closed: its warm runtimes stopped with it.
    assert (default["template"], default["min"], default["max"], default["claimed"], default["warm"]) == (
        "default",
        3,
        6,
        2,
        0,
    )
    assert default["claims_warm"] + default["claims_cold"] == 2
    wide = {**environment(data_dir), "COLUMNS": "200"}
    table = subprocess.run([str(BIN / "dockyard"), "pool", "status"], env=wide, capture_output=True, text=True)
    assert table.returncode == 0 and "default" in table.stdout and "3/3/6" in table.stdout, table.stdout


async def test_kill_9_mid_dispatch_interrupts_it_loses_nothing_and_frees_its_sandbox(
    data_dir: Path, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    pid_file = tmp_path / "server.pid"
    try:
        async with killable(data_dir, pid_file) as client:
            await settled(client, warm=3)
            done = await call(
                client, "dispatch", mode="remote", rationale="r", task_summary="quick", prompt="echo kept"
            )
            assert (await call(client, "await_dispatch", dispatch_id=done["dispatch_id"], timeout_s=60))[
                "status"
            ] == "completed"
            slow = await call(client, "dispatch", mode="remote", rationale="r", task_summary="slow", prompt="sleep 300")
            with anyio.fail_after(60):
                while (await call(client, "await_dispatch", dispatch_id=slow["dispatch_id"], timeout_s=0.2))[
                    "sandbox_id"
                ] is None:
                    pass
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            await anyio.sleep(0.5)
    except Exception:  # noqa: BLE001 - the client sees its server vanish; that is the point
        pass
    async with Client(
        StdioServerParameters(command=str(BIN / "dockyard"), args=["serve"], env=environment(data_dir))
    ) as client:
        after = await call(client, "await_dispatch", dispatch_id=slow["dispatch_id"], timeout_s=5)
        assert after["status"] == "interrupted" and "not re-run" in after["error"]
        kept = await call(client, "await_dispatch", dispatch_id=done["dispatch_id"], timeout_s=5)
        assert (kept["status"], kept["result"]) == ("completed", "kept\n")
        await settled(client, warm=3)
        with anyio.fail_after(60):  # the interrupted dispatch's sandbox goes back to the pool
            while (await pool(client))["claimed"]:
                await anyio.sleep(0.2)
        live = live_runtimes(data_dir)
        assert labelled_containers(docker_client, data_dir) == {r.container_id for r in live}


async def test_kill_9_mid_team_marks_busy_members_ready_tells_the_lead_and_a_message_resumes_them(
    data_dir: Path, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    script = 'if [ "$DOCKYARD_TURN" = 1 ] && [ "$DOCKYARD_ROLE" = builder ]; then sleep 300; fi; echo "$DOCKYARD_ROLE turn $DOCKYARD_TURN"; cat'
    pid_file = tmp_path / "server.pid"
    try:
        async with killable(data_dir, pid_file) as client:
            team = (await call(client, "team_create", name="night-shift"))["team_id"]
            for role in ("builder", "watcher"):
                await call(client, "team_spawn", team_id=team, role=role, prompt=script)
            with anyio.fail_after(90):
                while sorted(m["status"] for m in (await call(client, "team_tasks", team_id=team))["members"]) != [
                    "busy",
                    "idle",
                ]:
                    await anyio.sleep(0.2)
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            await anyio.sleep(0.5)
    except Exception:  # noqa: BLE001 - the client sees its server vanish; that is the point
        pass
    async with Client(
        StdioServerParameters(command=str(BIN / "dockyard"), args=["serve"], env=environment(data_dir))
    ) as client:
        view = await call(client, "team_tasks", team_id=team)
        assert view["notice"] == "Server was restarted. Teammates interrupted: builder. Use team_message to resume."
        states = {m["role"]: (m["status"], m["turns"]) for m in view["members"]}
        assert states == {"builder": ("ready", 1), "watcher": ("idle", 1)}  # marked ready, not re-run
        await anyio.sleep(1)
        assert {m["role"]: m["turns"] for m in (await call(client, "team_tasks", team_id=team))["members"]}[
            "builder"
        ] == 1
        sent = await call(client, "team_message", team_id=team, to="builder", body="carry on")
        assert sent["notice"] is not None  # told until the member works again
        with anyio.fail_after(60):
            while (
                builder := {m["role"]: m for m in (await call(client, "team_tasks", team_id=team))["members"]}[
                    "builder"
                ]
            )["status"] != "idle":
                await anyio.sleep(0.2)
        assert (
            builder["turns"] == 2
            and builder["last_output"].startswith("builder turn 2\n")
            and "carry on" in builder["last_output"]
        )
        assert (await call(client, "team_tasks", team_id=team))["notice"] is None
        await call(client, "team_shutdown", team_id=team)
        with anyio.fail_after(60):  # the members' sandboxes go back (destroyed or wiped), and nothing leaks
            while (await pool(client))["claimed"] or labelled_containers(docker_client, data_dir) != {
                r.container_id for r in live_runtimes(data_dir)
            }:
                await anyio.sleep(0.2)


def held_by(data_dir: Path, dispatch_id: str) -> list[Sandbox]:
    """Running sandboxes a dispatch made (its runner's run id is the dispatch's id)."""
    with Session(create_engine(f"sqlite:///{data_dir / 'dockyard.db'}")) as session:
        return list(
            session.exec(select(Sandbox).where(Sandbox.run_id == dispatch_id, Sandbox.status == "running")).all()
        )


async def test_kill_9_mid_snapshot_keeps_the_sandbox_running_and_removes_the_partial_snapshot(
    data_dir: Path, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """The snapshot holds the sandbox paused when dockyard dies: after a restart it runs again,
    with its files, and the half-written archive is gone."""
    pid_file = tmp_path / "server.pid"
    snapshots = data_dir / "snapshots"
    try:
        async with killable(data_dir, pid_file) as client:
            sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
            filled = await sh(
                client,
                sandbox_id,
                "head -c 400M /dev/zero > /workspace/big.bin && echo kept > /workspace/marker",
                timeout_s=120,
            )
            assert filled["exit_code"] == 0, filled
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: call(client, "sandbox_snapshot", sandbox_id=sandbox_id))
                with anyio.fail_after(60):
                    while not any(p.stat().st_size > 0 for p in snapshots.glob("snp_*/workspace.tar")):
                        await anyio.sleep(0.02)
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                await anyio.sleep(0.5)
    except Exception:  # noqa: BLE001 - the client sees its server vanish; that is the point
        pass
    assert list(snapshots.glob("snp_*")), "the snapshot should have been cut short mid-way"
    async with Client(
        StdioServerParameters(command=str(BIN / "dockyard"), args=["serve"], env=environment(data_dir))
    ) as client:
        assert list(snapshots.glob("snp_*")) == []
        ran = await sh(client, sandbox_id, "cat /workspace/marker; stat -c %s /workspace/big.bin")
        assert ran["stdout"] == f"kept\n{400 << 20}\n"
        assert [s["sandbox_id"] for s in (await call(client, "sandbox_list"))["sandboxes"]] == [sandbox_id]
        snap = await call(client, "sandbox_snapshot", sandbox_id=sandbox_id)  # and it can be snapshotted again
        assert snap["size_bytes"] > 400 << 20


async def test_kill_9_mid_team_dispatch_gives_back_every_member_sandbox_after_restart(
    data_dir: Path, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    pid_file = tmp_path / "server.pid"
    try:
        async with killable(data_dir, pid_file) as client:
            await settled(client, warm=3)
            team = await call(
                client,
                "dispatch",
                mode="team_multi_vm",
                rationale="r",
                task_summary="two slow parts",
                members=["sleep 300", "sleep 300"],
            )
            with anyio.fail_after(60):
                while len(held_by(data_dir, team["dispatch_id"])) < 2:
                    await anyio.sleep(0.1)
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
            await anyio.sleep(0.5)
    except Exception:  # noqa: BLE001 - the client sees its server vanish; that is the point
        pass
    async with Client(
        StdioServerParameters(command=str(BIN / "dockyard"), args=["serve"], env=environment(data_dir))
    ) as client:
        after = await call(client, "await_dispatch", dispatch_id=team["dispatch_id"], timeout_s=5)
        assert after["status"] == "interrupted"
        with anyio.fail_after(60):  # both members' sandboxes go back to the pool, not at their TTL
            while held_by(data_dir, team["dispatch_id"]) or (await pool(client))["claimed"]:
                await anyio.sleep(0.2)
        await settled(client, warm=3)
        assert labelled_containers(docker_client, data_dir) == {r.container_id for r in live_runtimes(data_dir)}
