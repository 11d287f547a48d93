"""The audit log on a real SQLite file: its chain, how tampering shows, its filters, and that an
action whose row cannot be written fails."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from datetime import timedelta, timezone
from pathlib import Path

import anyio
import pytest

from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.errors import AuditWriteError, InvalidRequestError, ScopeError
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import AuditEvent, Store
from dockyard.runtime.substrate.tokens import ADMIN, TokenService

pytestmark = pytest.mark.anyio

OPERATOR = Identity()
ALICE = Identity(user_id="alice", scopes=["sandbox:exec"], token_id="tok_alice")
RIVAL = Identity(workspace_id="rival", project_id="p", user_id="mallory", token_id="tok_mallory")
VERDICT = {"rows_checked", "intact", "first_broken_id", "reason"}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = Store(tmp_path / "dockyard.db")
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
def audit(store: Store) -> AuditLog:
    return AuditLog(store, store.path.parent)


def sql(store: Store, statement: str, *params: object) -> list[tuple]:
    """Run one statement on the SQLite file directly, as someone with the file could."""
    with closing(sqlite3.connect(store.path)) as db:
        rows = db.execute(statement, params).fetchall()
        db.commit()
    return rows


async def fill(audit: AuditLog, count: int) -> list[AuditEvent]:
    who = [OPERATOR, ALICE, RIVAL]
    return [
        await audit.append(
            who[i % 3], f"kind.{i % 2}", target=f"t{i}", outcome="ok", detail={"i": i}, duration_ms=i / 7
        )
        for i in range(count)
    ]


async def test_an_untouched_chain_verifies_across_batches(audit: AuditLog) -> None:
    assert (await audit.verify()).model_dump(include=VERDICT) == {
        "rows_checked": 0,
        "intact": True,
        "first_broken_id": None,
        "reason": None,
    }
    await fill(audit, 10)
    for batch in (1, 3, 10, 1000):
        result = await audit.verify(batch=batch)
        assert (result.intact, result.rows_checked, result.first_broken_id) == (True, 10, None)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("detail", '{"i": 99}'),
        ("outcome", "error"),
        ("user_id", "someone"),
        ("token_id", "tok_forged"),
        ("ts", "2000-01-01 00:00:00.000000"),
        ("duration_ms", 0.5),
    ],
)
async def test_an_edited_row_is_the_first_broken_one(audit: AuditLog, store: Store, column: str, value: object) -> None:
    rows = await fill(audit, 10)
    sql(store, f"UPDATE auditevent SET {column} = ? WHERE id = ?", value, rows[4].id)
    result = await audit.verify(batch=3)
    assert (result.intact, result.first_broken_id, result.rows_checked) == (False, rows[4].id, 5)
    assert "content does not match its hash" in (result.reason or "")


async def test_clearing_a_token_id_breaks_the_row(audit: AuditLog, store: Store) -> None:
    rows = await fill(audit, 4)
    assert rows[1].token_id == "tok_alice"
    assert sql(store, "SELECT token_id FROM auditevent WHERE id = ?", rows[1].id) == [("tok_alice",)]
    sql(store, "UPDATE auditevent SET token_id = NULL WHERE id = ?", rows[1].id)
    assert (await audit.verify()).first_broken_id == rows[1].id


@pytest.mark.parametrize("deleted", [0, 2, 3, 6])
async def test_a_deleted_row_breaks_the_link_of_the_row_after_it(audit: AuditLog, store: Store, deleted: int) -> None:
    rows = await fill(audit, 8)
    sql(store, "DELETE FROM auditevent WHERE id = ?", rows[deleted].id)
    result = await audit.verify(batch=3)
    assert (result.intact, result.first_broken_id) == (False, rows[deleted + 1].id)
    assert result.rows_checked == deleted + 1
    assert f"row {rows[deleted].id} was deleted from the" in (result.reason or "")
    assert [f.kind for f in result.findings] == ["deleted"]


async def test_query_filters_newest_first(audit: AuditLog) -> None:
    rows = await fill(audit, 9)
    ids = [r.id for r in rows]

    everything = await audit.query()
    assert [r.id for r in everything] == ids[::-1]
    local = await audit.query(workspace_id="local")
    assert [r.id for r in local] == [i for n, i in enumerate(ids) if n % 3 != 2][::-1]
    assert {r.workspace_id for r in await audit.query(workspace_id="rival")} == {"rival"}
    assert [r.id for r in await audit.query(actor="alice")] == [ids[7], ids[4], ids[1]]
    assert [r.token_id for r in await audit.query(actor="alice")] == ["tok_alice"] * 3
    assert [r.id for r in await audit.query(workspace_id="local", kind="kind.1")] == [ids[7], ids[3], ids[1]]
    assert [r.id for r in await audit.query(limit=2)] == [ids[8], ids[7]]

    since, until = rows[3].ts, rows[6].ts
    assert [r.id for r in await audit.query(since=since, until=until)] == [ids[5], ids[4], ids[3]]
    # a time without a zone is UTC; one in another zone means the same instant
    assert [r.id for r in await audit.query(since=since.replace(tzinfo=None))] == ids[3:][::-1]
    plus_two = timezone(timedelta(hours=2))
    assert [r.id for r in await audit.query(until=until.astimezone(plus_two))] == ids[:6][::-1]
    assert await audit.query(since=rows[-1].ts + timedelta(seconds=1)) == []


async def test_denied_calls_are_rows_with_their_token(audit: AuditLog, store: Store) -> None:
    tokens = TokenService(store, audit, None)
    alice = (await tokens.mint(ADMIN, scopes=["sandbox:exec"], workspace_id="local", user_id="alice")).identity
    with pytest.raises(ScopeError):
        await tokens.require(alice, "audit:read", "audit.query")
    [row] = await audit.query(kind="audit.query")
    assert (row.outcome, row.user_id, row.token_id) == ("denied", "alice", alice.token_id)
    assert (await audit.verify()).intact


def refuse_writes(store: Store) -> None:
    sql(
        store, "CREATE TRIGGER refuse BEFORE INSERT ON auditevent BEGIN SELECT RAISE(ABORT, 'audit store is full'); END"
    )


async def test_an_action_whose_row_cannot_be_written_fails(audit: AuditLog, store: Store) -> None:
    await fill(audit, 2)
    refuse_writes(store)

    done = []
    with pytest.raises(AuditWriteError) as failed:
        async with audit.record(OPERATOR, "sandbox.exec", "sbx_1", command="true"):
            done.append(True)
    assert done == [True]
    message = str(failed.value)
    assert "audit row for this sandbox.exec could not be written (audit store is full)" in message
    assert "reported as failed" in message

    with pytest.raises(
        AuditWriteError, match=r"sandbox.exec failed \(bad path\) and its audit row could not be written either"
    ):
        async with audit.record(OPERATOR, "sandbox.exec", "sbx_1"):
            raise InvalidRequestError("bad path")

    # a cancelled action stays cancelled; the lost row is in the server log
    with anyio.CancelScope() as scope:
        async with audit.record(OPERATOR, "sandbox.exec", "sbx_1"):
            scope.cancel()
            await anyio.sleep(5)
    assert scope.cancelled_caught

    sql(store, "DROP TRIGGER refuse")
    assert (await audit.verify()).model_dump(include=VERDICT) == {
        "rows_checked": 2,
        "intact": True,
        "first_broken_id": None,
        "reason": None,
    }
    async with audit.record(OPERATOR, "sandbox.exec", "sbx_1"):
        pass
    assert [r.outcome for r in await audit.query()] == ["ok", "ok", "ok"]
    assert (await audit.verify()).intact


def swap(store: Store, first: int, second: int) -> None:
    """Exchange two rows' whole content, ids kept: the log's order changed, each row intact."""
    with closing(sqlite3.connect(store.path)) as db:
        names = [c[1] for c in db.execute("PRAGMA table_info(auditevent)") if c[1] != "id"]
        rows = {
            i: db.execute(f"SELECT {', '.join(names)} FROM auditevent WHERE id = ?", (i,)).fetchone()
            for i in (first, second)
        }
        for target, source in ((first, second), (second, first)):
            db.execute(
                f"UPDATE auditevent SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?", (*rows[source], target)
            )
        db.commit()


@pytest.mark.parametrize(("first", "second"), [(0, 1), (2, 5), (6, 7)])
async def test_two_rows_swapped_are_found_where_the_order_breaks(
    audit: AuditLog, store: Store, first: int, second: int
) -> None:
    rows = await fill(audit, 8)
    swap(store, rows[first].id, rows[second].id)
    result = await audit.verify(batch=3)
    assert (result.intact, result.first_broken_id, result.rows_checked) == (False, rows[first].id, first + 1)
    assert [f.kind for f in result.findings] == ["reordered"]
    assert "rows were swapped, moved or replaced" in (result.reason or "")


async def test_a_chain_of_every_kind_of_row_verifies_and_links_each_row_to_the_one_before(
    audit: AuditLog, store: Store
) -> None:
    rows = await fill(audit, 6)
    async with audit.record(ALICE, "sandbox.exec", "sbx_1", started=True, command="true"):
        pass
    with pytest.raises(InvalidRequestError):
        async with audit.record(RIVAL, "sandbox.exec", "sbx_2"):
            raise InvalidRequestError("bad path")
    chain = sql(store, "SELECT id, prev_hash, hash, mac FROM auditevent ORDER BY id")
    assert [r[0] for r in chain] == list(range(1, len(rows) + 4))
    assert [r[1] for r in chain] == ["0" * 64] + [r[2] for r in chain[:-1]]
    assert all(r[3] for r in chain)  # every row keyed
    assert (await audit.verify()).model_dump(include=VERDICT) == {
        "rows_checked": 9,
        "intact": True,
        "first_broken_id": None,
        "reason": None,
    }
