"""audit_query and audit_verify through the official MCP client, on the server's real SQLite
file: the chain after real actions, tampering found to the row (by the tool and by
`dockyard audit verify`), the filters, the workspace boundary, and failing closed."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.settings import Identity, Settings
from dockyard.runtime.substrate.store import Store
from dockyard.server.app import build_server
from tests.conftest import call, call_error

pytestmark = pytest.mark.anyio

DOCKYARD = str(Path(sys.executable).parent / "dockyard")
RIVAL = Identity(workspace_id="rival", project_id="p", user_id="mallory", token_id="tok_mallory")
ALICE = Identity(user_id="alice", token_id="tok_alice")


def sql(settings: Settings, statement: str, *params: object) -> list[tuple]:
    """Run one statement on the server's SQLite file directly, as someone with the file could."""
    with closing(sqlite3.connect(settings.store_path)) as db:
        rows = db.execute(statement, params).fetchall()
        db.commit()
    return rows


async def cli_verify(settings: Settings, *args: str) -> tuple[int, str]:
    env = {**os.environ, "DOCKYARD_DATA_DIR": str(settings.data_dir)}
    env.pop("DOCKYARD_CONFIG", None)
    done = await anyio.run_process([DOCKYARD, "audit", "verify", *args], env=env, check=False)
    return done.returncode, done.stdout.decode()


async def seed(settings: Settings, *rows: tuple[Identity, str]) -> None:
    """Append rows as other callers would, through the audit log on the same file."""
    store = Store(settings.store_path)
    await store.open()
    try:
        log = AuditLog(store, settings.data_dir)
        for who, kind in rows:
            await log.append(
                who, kind, target="sbx_elsewhere", outcome="ok", detail={"command": f"{who.user_id} was here"}
            )
    finally:
        await store.close()


def verdict_of(result: dict[str, Any]) -> dict[str, Any]:
    """The verdict's summary fields (the findings and head figures are asserted where they matter)."""
    return {name: result[name] for name in ("rows_checked", "intact", "first_broken_id", "reason")}


async def work(client: Client) -> str:
    box = (await call(client, "sandbox_create"))["sandbox_id"]
    assert (await call(client, "sandbox_exec", sandbox_id=box, command="echo hi"))["exit_code"] == 0
    await call(client, "sandbox_write_file", sandbox_id=box, path="notes.txt", content="hello")
    await call(client, "sandbox_destroy", sandbox_id=box)
    return box


async def rows(client: Client, **filters: Any) -> list[dict[str, Any]]:
    return (await call(client, "audit_query", details=True, **filters))["rows"]


async def test_the_chain_verifies_after_real_actions_and_tampering_names_the_row(
    client: Client, settings: Settings
) -> None:
    box = await work(client)
    log = await rows(client)
    # a command is on the record before it runs (started) and again when it ends
    assert [r["kind"] for r in log] == [
        "sandbox.destroy",
        "sandbox.write_file",
        "sandbox.exec",
        "sandbox.exec",
        "sandbox.create",
    ]
    assert [r["outcome"] for r in log] == ["ok", "ok", "ok", "started", "ok"]
    assert all(r["target"] == box for r in log)
    assert all((r["workspace_id"], r["user_id"], r["token_id"]) == ("local", "operator", None) for r in log)
    destroy, write, exec_, started, create = (r["id"] for r in log)
    assert log[2]["detail"]["command"] == "echo hi" and log[2]["detail"]["exit_code"] == 0
    assert log[2]["detail"]["started_id"] == started and log[3]["detail"] == {"command": "echo hi", "cwd": "/workspace"}

    assert verdict_of(await call(client, "audit_verify")) == {
        "rows_checked": 5,
        "intact": True,
        "first_broken_id": None,
        "reason": None,
    }
    assert await cli_verify(settings) == (0, "audit log intact: 5 rows, signed head at 5 rows\n")

    # edit what the command was: the tool and the CLI name exactly that row
    [(original,)] = sql(settings, "SELECT detail FROM auditevent WHERE id = ?", exec_)
    sql(settings, "UPDATE auditevent SET detail = ? WHERE id = ?", original.replace("echo hi", "echo bye"), exec_)
    verdict = await call(client, "audit_verify")
    assert (verdict["intact"], verdict["first_broken_id"], verdict["rows_checked"]) == (False, exec_, 3)
    code, out = await cli_verify(settings)
    assert code == 1 and out.startswith(f"audit log broken at row {exec_} (edited): ")
    code, out = await cli_verify(settings, "--json")
    assert code == 1 and json.loads(out)["first_broken_id"] == exec_ and json.loads(out)["intact"] is False

    # put it back: intact again; then turn a recorded outcome around
    sql(settings, "UPDATE auditevent SET detail = ? WHERE id = ?", original, exec_)
    assert (await call(client, "audit_verify"))["intact"] is True
    sql(settings, "UPDATE auditevent SET outcome = 'error' WHERE id = ?", write)
    assert (await call(client, "audit_verify"))["first_broken_id"] == write
    sql(settings, "UPDATE auditevent SET outcome = 'ok' WHERE id = ?", write)

    # delete a row in the middle: the row after it no longer links
    sql(settings, "DELETE FROM auditevent WHERE id = ?", write)
    verdict = await call(client, "audit_verify")
    assert (verdict["intact"], verdict["first_broken_id"]) == (False, destroy)
    assert f"row {write} was deleted from the middle" in verdict["reason"]
    code, out = await cli_verify(settings)
    assert code == 1 and f"broken at row {destroy} (deleted):" in out
    assert create < started < exec_ < write < destroy


async def test_query_filters_and_never_shows_another_workspace(client: Client, settings: Settings) -> None:
    await work(client)
    await seed(settings, (RIVAL, "sandbox.exec"), (ALICE, "sandbox.exec"), (RIVAL, "sandbox.create"))

    everything = await rows(client)
    assert len(everything) == 6  # the command's started row and its ending row among them
    assert {r["workspace_id"] for r in everything} == {"local"}
    assert "mallory" not in json.dumps(everything)
    assert [r["kind"] for r in await rows(client, workspace_id="local")] == [r["kind"] for r in everything]

    [alice] = await rows(client, actor="alice")
    assert (alice["token_id"], alice["kind"], alice["detail"]) == (
        "tok_alice",
        "sandbox.exec",
        {"command": "alice was here"},
    )
    assert [r["user_id"] for r in await rows(client, kind="sandbox.exec")] == ["alice", "operator", "operator"]
    assert await rows(client, actor="mallory") == []
    assert await rows(client, kind="sandbox.create", actor="operator") == [everything[-1]]

    # time window: since is inclusive, until exclusive
    assert await rows(client, since=alice["ts"]) == [alice]
    assert await rows(client, until=alice["ts"]) == everything[1:]
    assert await rows(client, since=everything[3]["ts"], until=everything[1]["ts"]) == everything[2:4]

    page = await call(client, "audit_query", details=True, limit=2)
    assert (page["rows"], page["more"]) == (everything[:2], True)
    assert (await call(client, "audit_query"))["more"] is False

    # naming another workspace is refused, and the refusal is itself a row
    message = await call_error(client, "audit_query", details=True, workspace_id="rival")
    assert "only your own workspace's audit rows ('local')" in message and "rival" in message
    [denied] = await rows(client, kind="audit.query")
    assert (denied["outcome"], denied["target"], denied["workspace_id"]) == ("denied", "rival", "local")
    assert "1000" in await call_error(client, "audit_query", limit=1001)

    assert (await call(client, "audit_verify"))["intact"] is True


async def test_a_time_window_at_the_ends_of_the_calendar_is_answered(client: Client) -> None:
    """Year 1 at +14:00 is before year 1 in UTC: such a bound keeps or drops every row, never fails."""
    await work(client)
    some = await rows(client)
    assert some
    assert await rows(client, since="0001-01-01T00:00:00+14:00") == some
    assert await rows(client, until="0001-01-01T00:00:00+14:00") == []
    assert await rows(client, until="9999-12-31T23:59:59-14:00") == some
    assert await rows(client, since="9999-12-31T23:59:59-14:00") == []


async def test_the_admin_reads_every_workspace(settings: Settings, cleanup: None) -> None:
    await seed(settings, (RIVAL, "sandbox.exec"), (ALICE, "sandbox.exec"))
    admin = settings.model_copy(update={"operator": Identity(workspace_id="*", project_id="*", user_id="admin")})
    async with Client(build_server(admin)) as client:
        assert [r["workspace_id"] for r in await rows(client)] == ["local", "rival"]
        assert [r["user_id"] for r in await rows(client, workspace_id="rival")] == ["mallory"]
        assert verdict_of(await call(client, "audit_verify")) == {
            "rows_checked": 2,
            "intact": True,
            "first_broken_id": None,
            "reason": None,
        }


async def test_an_action_whose_audit_row_cannot_be_written_fails(client: Client, settings: Settings) -> None:
    box = (await call(client, "sandbox_create"))["sandbox_id"]
    sql(settings, "CREATE TRIGGER refuse BEFORE INSERT ON auditevent BEGIN SELECT RAISE(ABORT, 'audit disk full'); END")
    message = await call_error(client, "sandbox_exec", sandbox_id=box, command="touch ran")
    # the row that opens a command comes first: without it, the command does not run at all
    assert (
        "the audit row that opens this sandbox.exec could not be written (audit disk full), so it was not started"
        in message
    )
    sql(settings, "DROP TRIGGER refuse")

    assert [r["kind"] for r in await rows(client)] == ["sandbox.create"]
    assert (await call(client, "sandbox_exec", sandbox_id=box, command="test -e ran"))["exit_code"] == 1
    await call(client, "sandbox_destroy", sandbox_id=box)
    assert verdict_of(await call(client, "audit_verify")) == {
        "rows_checked": 4,
        "intact": True,
        "first_broken_id": None,
        "reason": None,
    }
