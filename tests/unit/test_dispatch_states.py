"""The dispatch lifecycle without Docker: every named move from every state, allowed or refused,
on a row and through a real SQLite store (the move reads and writes the row in one transaction)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from itertools import product
from pathlib import Path

import pytest

from dockyard.runtime.substrate.errors import NotFoundError, StateError
from dockyard.runtime.substrate.store import Dispatch, DispatchStatus, Store, utcnow
from dockyard.runtime.work.dispatch.records import Board
from dockyard.runtime.work.dispatch.states import (
    CANCEL,
    MOVES,
    START,
    Move,
    accept_result,
    end,
    move,
    step,
)

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED, INTERRUPTED = DispatchStatus
# The lifecycle as the design card draws it: each move and the only states it may start from.
ALLOWED = {
    "start": {QUEUED},
    "complete": {RUNNING},
    "fail": {QUEUED, RUNNING},
    "cancel": {QUEUED, RUNNING},
    "interrupt": {RUNNING},
}


def dispatch(status: str = QUEUED, dispatch_id: str = "dsp_1") -> Dispatch:
    return Dispatch(
        id=dispatch_id,
        mode="remote",
        requested_mode="remote",
        runner="script",
        rationale="r",
        task_summary="t",
        prompt="true",
        workspace_id="w",
        project_id="p",
        user_id="u",
        status=status,
    )


def test_the_stored_values_stay_the_strings_they_always_were() -> None:
    assert [s.value for s in DispatchStatus] == ["queued", "running", "completed", "failed", "cancelled", "interrupted"]
    assert DispatchStatus.FINAL == {"completed", "failed", "cancelled", "interrupted"}
    assert dispatch().status == "queued" and Dispatch.model_fields["status"].default == "queued"


def test_the_moves_are_the_ones_the_lifecycle_draws() -> None:
    assert {m.name: set(m.only_from) for m in MOVES} == ALLOWED
    assert {m.name: m.to for m in MOVES} == {
        "start": RUNNING,
        "complete": COMPLETED,
        "fail": FAILED,
        "cancel": CANCELLED,
        "interrupt": INTERRUPTED,
    }


@pytest.mark.parametrize(
    ("to", "state"),
    [(m, s) for m, s in product(MOVES, DispatchStatus) if s in ALLOWED[m.name]],
    ids=lambda v: getattr(v, "name", v),
)
def test_an_allowed_move_sets_the_new_state_and_its_values(to: Move, state: DispatchStatus) -> None:
    row = dispatch(state)
    now = utcnow()
    move(row, to, finished_at=now, error="why")
    assert (row.status, row.finished_at, row.error) == (to.to, now, "why")
    assert type(row.status) is str  # stored as the plain string


@pytest.mark.parametrize(
    ("to", "state"),
    [(m, s) for m, s in product(MOVES, DispatchStatus) if s not in ALLOWED[m.name]],
    ids=lambda v: getattr(v, "name", v),
)
def test_a_refused_move_raises_and_leaves_the_row_as_it_was(to: Move, state: DispatchStatus) -> None:
    row = dispatch(state)
    with pytest.raises(StateError) as refused:
        move(row, to, error="why")
    assert (row.status, row.error) == (state, None)
    assert f"dispatch 'dsp_1' is {state}, so it cannot {to.name}" in str(refused.value)


def test_a_final_dispatch_never_moves_again() -> None:
    for state, to in product(DispatchStatus.FINAL, MOVES):
        with pytest.raises(StateError):
            move(dispatch(state), to)


@pytest.mark.parametrize("status", sorted(DispatchStatus.FINAL))
def test_a_running_dispatch_ends_in_each_final_state_by_the_move_that_leads_there(status: str) -> None:
    row = dispatch(RUNNING)
    end(row, DispatchStatus(status))
    assert row.status == status


def test_a_dispatch_that_never_ran_cannot_end_completed() -> None:
    with pytest.raises(StateError):
        end(dispatch(QUEUED), COMPLETED)


def test_a_submitted_result_is_taken_once_and_only_while_running() -> None:
    row = dispatch(RUNNING)
    accept_result(row, "42")
    assert (row.result, row.submitted) == ("42", True)
    with pytest.raises(StateError, match="a result was already submitted for this dispatch"):
        accept_result(row, "43")
    assert row.result == "42"
    for state in set(DispatchStatus) - {RUNNING}:
        with pytest.raises(StateError, match="the dispatch is not running"):
            accept_result(dispatch(state), "x")


# -- in the store ---------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    store = Store(tmp_path / "dockyard.db")
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.mark.anyio
async def test_a_move_in_the_store_reads_and_writes_the_row_in_one_transaction(store: Store) -> None:
    await store.add(dispatch())
    moved = await store.run(step("dsp_1", START, started_at=utcnow()))
    assert moved.status == RUNNING
    await store.run(step("dsp_1", COMPLETED))
    stored = await store.get(Dispatch, "dsp_1")
    assert stored is not None and stored.status == "completed" and stored.started_at is not None


@pytest.mark.anyio
async def test_a_refused_move_in_the_store_writes_nothing(store: Store) -> None:
    await store.add(dispatch(COMPLETED))
    with pytest.raises(StateError):
        await store.run(step("dsp_1", CANCEL, error="cancelled by its owner"))
    stored = await store.get(Dispatch, "dsp_1")
    assert stored is not None and (stored.status, stored.error) == ("completed", None)


@pytest.mark.anyio
async def test_a_move_of_an_unknown_dispatch_says_so(store: Store) -> None:
    with pytest.raises(NotFoundError, match="unknown dispatch 'dsp_none'"):
        await store.run(step("dsp_none", START))


@pytest.mark.anyio
async def test_the_board_tells_of_each_move_and_of_no_refused_one(store: Store) -> None:
    board = Board(store)
    told: list[tuple[str, str]] = []

    async def heard(dispatch_id: str, workspace_id: str) -> None:
        told.append((dispatch_id, workspace_id))

    board.on_change = heard
    await store.add(dispatch())
    await board.move("dsp_1", START)
    assert told == [("dsp_1", "w")]
    with pytest.raises(StateError):
        await board.move("dsp_1", START)
    stored = await store.get(Dispatch, "dsp_1")
    assert stored is not None and stored.status == "running" and told == [("dsp_1", "w")]
