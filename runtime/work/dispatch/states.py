r"""A dispatch's lifecycle: named moves between `DispatchStatus` states, each allowed only from
the states listed for it, and applied inside the transaction that reads the row.

    queued --start--> running --complete--> completed
       |                 |----fail--------> failed
       |                 |----cancel------> cancelled
       |                 \----interrupt---> interrupted   (dockyard stopped while it ran)
       |----fail------------------------> failed         (its runtime never came)
       \----cancel----------------------> cancelled      (its owner cancelled before it ran)

A move asked of a dispatch in any other state raises `StateError`: a final dispatch never moves
again. A runner's submitted result is taken only while the dispatch runs, and only once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlmodel import Session

from dockyard.runtime.substrate.errors import NotFoundError, StateError
from dockyard.runtime.substrate.store import Dispatch, DispatchStatus

__all__ = ["CANCEL", "COMPLETE", "FAIL", "INTERRUPT", "MOVES", "START", "Move", "accept_result", "end", "move", "step"]


@dataclass(frozen=True)
class Move:
    """A named move to `to`, allowed only from the states in `only_from`."""

    name: str
    to: DispatchStatus
    only_from: frozenset[DispatchStatus]


START = Move("start", DispatchStatus.RUNNING, frozenset({DispatchStatus.QUEUED}))
COMPLETE = Move("complete", DispatchStatus.COMPLETED, frozenset({DispatchStatus.RUNNING}))
FAIL = Move("fail", DispatchStatus.FAILED, frozenset({DispatchStatus.QUEUED, DispatchStatus.RUNNING}))
CANCEL = Move("cancel", DispatchStatus.CANCELLED, frozenset({DispatchStatus.QUEUED, DispatchStatus.RUNNING}))
INTERRUPT = Move("interrupt", DispatchStatus.INTERRUPTED, frozenset({DispatchStatus.RUNNING}))
MOVES = (START, COMPLETE, FAIL, CANCEL, INTERRUPT)
# How a run's end is told to the store: the move that takes it to each final state.
_ENDING = {m.to: m for m in (COMPLETE, FAIL, CANCEL, INTERRUPT)}


def move(row: Dispatch, to: Move, **values: object) -> None:
    """Move `row` along `to` (and set `values` with it), or raise `StateError` if its state
    does not allow that move."""
    if row.status not in to.only_from:
        allowed = " or ".join(sorted(to.only_from))
        raise StateError(f"dispatch '{row.id}' is {row.status}, so it cannot {to.name} (only a {allowed} dispatch can)")
    row.status = to.to.value
    for name, value in values.items():
        setattr(row, name, value)


def end(row: Dispatch, to: DispatchStatus, **values: object) -> None:
    """End `row` in the final state `to`, by the move that leads there."""
    move(row, _ENDING[to], **values)


def step(dispatch_id: str, to: Move | DispatchStatus, **values: object) -> Callable[[Session], Dispatch]:
    """A store step that reads the dispatch and moves it along `to` (a move, or the final state
    to end in) in the same transaction; it returns the row as it now is."""

    def write(session: Session) -> Dispatch:
        row = session.get(Dispatch, dispatch_id)
        if row is None:
            raise NotFoundError(f"unknown dispatch '{dispatch_id}'; dispatch returns the ids you can wait on")
        if isinstance(to, Move):
            move(row, to, **values)
        else:
            end(row, to, **values)
        session.add(row)
        return row

    return write


def accept_result(row: Dispatch, result: str) -> None:
    """Take a runner's submitted result: only while the dispatch runs, and only once."""
    if row.status != DispatchStatus.RUNNING:
        raise StateError("the dispatch is not running")
    if row.submitted:
        raise StateError("a result was already submitted for this dispatch")
    row.result, row.submitted = result, True
