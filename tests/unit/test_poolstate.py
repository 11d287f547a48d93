"""The pool's transitions on a real SQLite file: each step the pool manager takes moves a runtime
only from the states that allow it, writes a PoolEvent for every move and nothing for a
refusal, and writes the owner's side in the same transaction (or nothing at all).

    provisioning -> warm -> claimed -> draining -> warm
    any live state -> destroying -> destroyed; any live state -> lost
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine as SqlEngine
from sqlmodel import Session, SQLModel, col, create_engine, select

from dockyard.runtime.runtimes.poolstate import Pool, claim_warm, drain, transition
from dockyard.runtime.substrate.settings import PoolShape
from dockyard.runtime.substrate.store import PoolEvent, Runtime, RuntimeState

S = RuntimeState
STATES = (S.PROVISIONING, S.WARM, S.CLAIMED, S.DRAINING, S.DESTROYING, S.DESTROYED, S.LOST)
_ids = itertools.count()

Step = Callable[[str, list[str]], Callable[[Session], Any]]


def _bind_into(bound: list[str]) -> Callable[[Session, Runtime], None]:
    def bind(session: Session, row: Runtime) -> None:
        bound.append(row.id)

    return bind


# Each step of the pool manager, as it calls it, and the states it may move a runtime from.
STEPS: dict[str, tuple[Step, tuple[str, ...], str]] = {
    "ready": (
        lambda rid, bound: transition(rid, S.WARM, "ready", only_from=(S.PROVISIONING,)),
        (S.PROVISIONING,),
        S.WARM,
    ),
    "claimed warm": (lambda rid, bound: claim_warm(rid, _bind_into(bound)), (S.WARM,), S.CLAIMED),
    "released": (lambda rid, bound: drain(rid, _bind_into(bound), "released"), (S.CLAIMED,), S.DRAINING),
    "recycled": (
        lambda rid, bound: transition(rid, S.WARM, "recycled", only_from=(S.DRAINING,)),
        (S.DRAINING,),
        S.WARM,
    ),
    "destroying": (lambda rid, bound: transition(rid, S.DESTROYING, "gone", only_from=S.LIVE), S.LIVE, S.DESTROYING),
    "destroyed": (lambda rid, bound: transition(rid, S.DESTROYED, "gone", only_from=S.LIVE), S.LIVE, S.DESTROYED),
    "lost": (lambda rid, bound: transition(rid, S.LOST, "vanished", only_from=S.LIVE), S.LIVE, S.LOST),
}
# The lifecycle's edges, as the store's docstring draws them.
EDGES = {(S.PROVISIONING, S.WARM), (S.WARM, S.CLAIMED), (S.CLAIMED, S.DRAINING), (S.DRAINING, S.WARM)} | {
    (live, end) for live in S.LIVE for end in (S.DESTROYING, S.DESTROYED, S.LOST)
}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SqlEngine]:
    engine = create_engine(f"sqlite:///{tmp_path / 'dockyard.db'}")
    SQLModel.metadata.create_all(engine)
    yield engine
    engine.dispose()


def run(db: SqlEngine, step: Callable[[Session], Any]) -> Any:
    """One step in one transaction, as `Store.run` runs it."""
    with Session(db, expire_on_commit=False) as session, session.begin():
        return step(session)


def runtime_in(db: SqlEngine, state: str, **fields: Any) -> Runtime:
    row = Runtime(
        id=f"rt_{next(_ids)}",
        template="default",
        image="img",
        container_name="c",
        network="none",
        cpus=1.0,
        memory_mb=512,
        state=state,
        **fields,
    )
    return run(db, lambda s: (s.add(row), row)[1])


def row_of(db: SqlEngine, runtime_id: str) -> Runtime:
    found = run(db, lambda s: s.get(Runtime, runtime_id))
    assert found is not None
    return found


def events(db: SqlEngine, runtime_id: str) -> list[tuple[str | None, str, str]]:
    stmt = select(PoolEvent).where(PoolEvent.runtime_id == runtime_id).order_by(col(PoolEvent.id))
    return [(e.from_state, e.to_state, e.reason) for e in run(db, lambda s: list(s.exec(stmt).all()))]


@pytest.mark.parametrize("name", list(STEPS))
def test_each_step_moves_a_runtime_from_the_states_that_allow_it_and_refuses_every_other(
    db: SqlEngine, name: str
) -> None:
    make, allowed, to = STEPS[name]
    for state in STATES:
        row = runtime_in(db, state, sandbox_id="sbx_1" if state == S.CLAIMED else None)
        bound: list[str] = []
        result = run(db, make(row.id, bound))
        after = row_of(db, row.id)
        if state in allowed:
            assert after.state == to and (state, to) in EDGES, f"{name} from {state}"
            assert [(e[0], e[1]) for e in events(db, row.id)] == [(state, to)]
            assert after.state_at >= row.state_at
        else:
            assert (after.state, after.state_at) == (state, row.state_at), f"{name} moved a runtime from {state}"
            assert events(db, row.id) == [], f"{name} from {state} left an event"
            assert bound == [] and result is None


@pytest.mark.parametrize("name", list(STEPS))
def test_a_step_on_a_runtime_the_store_does_not_hold_writes_nothing(db: SqlEngine, name: str) -> None:
    bound: list[str] = []
    assert run(db, STEPS[name][0]("rt_missing", bound)) is None
    assert bound == [] and events(db, "rt_missing") == []


def test_a_warm_runtime_is_claimed_once_and_the_owner_is_written_with_the_claim(db: SqlEngine) -> None:
    row = runtime_in(db, S.WARM, claims=2)
    first: list[str] = []
    second: list[str] = []
    claimed = run(db, claim_warm(row.id, _bind_into(first)))
    assert run(db, claim_warm(row.id, _bind_into(second))) is None  # the second claimer finds it taken
    assert (claimed.id, claimed.state, claimed.claims) == (row.id, S.CLAIMED, 3)
    assert (first, second) == ([row.id], [])
    assert events(db, row.id) == [(S.WARM, S.CLAIMED, "claimed warm")]


@pytest.mark.parametrize("step", ["claimed warm", "released"])
def test_an_owner_that_cannot_be_written_leaves_the_runtime_where_it_was(db: SqlEngine, step: str) -> None:
    _, (state,), _ = STEPS[step]
    row = runtime_in(db, state, sandbox_id="sbx_1", workspace_id="acme")

    def failing(session: Session, runtime: Runtime) -> None:
        raise RuntimeError("the owner's row could not be written")

    target = claim_warm(row.id, failing) if step == "claimed warm" else drain(row.id, failing, "released")
    with pytest.raises(RuntimeError):
        run(db, target)
    after = row_of(db, row.id)
    assert (after.state, after.claims, after.sandbox_id, after.workspace_id) == (state, 0, "sbx_1", "acme")
    assert events(db, row.id) == []


def test_a_released_runtime_drains_owned_by_nobody(db: SqlEngine) -> None:
    row = runtime_in(db, S.CLAIMED, sandbox_id="sbx_1", workspace_id="acme")
    bound: list[str] = []
    drained = run(db, drain(row.id, _bind_into(bound), "sandbox destroyed"))
    assert (drained.state, drained.sandbox_id, drained.workspace_id) == (S.DRAINING, None, None)
    assert bound == [row.id]
    assert events(db, row.id) == [(S.CLAIMED, S.DRAINING, "sandbox destroyed")]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(walk=st.lists(st.sampled_from(sorted(STEPS)), max_size=8))
def test_any_sequence_of_steps_follows_the_lifecycle_and_its_events_tell_the_whole_path(
    db: SqlEngine, walk: list[str]
) -> None:
    row = runtime_in(db, S.PROVISIONING)
    for name in walk:
        run(db, STEPS[name][0](row.id, []))
    path = events(db, row.id)
    assert all((from_state, to) in EDGES for from_state, to, _ in path)
    assert [to for _, to, _ in path[:-1]] == [
        from_state for from_state, _, _ in path[1:]
    ]  # each move starts where the last ended
    assert row_of(db, row.id).state == (path[-1][1] if path else S.PROVISIONING)


def test_a_pool_counts_what_takes_room_and_what_each_workspace_holds() -> None:
    pool = Pool("default", PoolShape(min=1, max=4), "none")
    pool.states = {"a": S.PROVISIONING, "b": S.WARM, "c": S.CLAIMED, "d": S.DRAINING, "e": S.DESTROYING}
    pool.holders = {"c": "acme", "b": "acme", "x": "rival"}
    assert pool.total == 4  # a runtime being destroyed no longer takes room
    assert (pool.count(S.WARM, S.CLAIMED), pool.held("acme"), pool.held("rival"), pool.held("other")) == (2, 2, 1, 0)
    assert pool.prewarms and not Pool("net", PoolShape(), "workspace").prewarms
