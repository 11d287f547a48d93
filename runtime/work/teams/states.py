r"""The lifecycles of teams, members, tasks and plans, as named transitions.

    team    active -> shut down
    member  starting -> busy <-> idle                   a turn, then waiting for a message
            starting | busy -> ready                    a restart cut it short; a message resumes it
            ready | idle -> starting                    its sandbox is made again
            starting | busy | idle | ready -> failed    it could not start, or hit an unexpected error
            anything but stopped -> stopped             shut down
    task    open -> claimed -> done | failed
    plan    (none) | pending | rejected -> pending -> approved | rejected

A transition is applied to a row inside the transaction that read it (as the pool's
`transition` is): a row in a state the transition does not allow is refused with a
`StateError`, and the transaction writes nothing. The states are stored as their strings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from dockyard.runtime.substrate.errors import StateError
from dockyard.runtime.substrate.store import MemberStatus, PlanStatus, TaskStatus, TeamStatus

__all__ = [
    "APPROVE_PLAN",
    "BEGIN_TURN",
    "CLAIM_TASK",
    "FAIL_MEMBER",
    "FAIL_TASK",
    "FINISH_TASK",
    "INTERRUPT_MEMBER",
    "LIVE_MEMBER",
    "PREPARE_MEMBER",
    "PROPOSE_PLAN",
    "REJECT_PLAN",
    "REST_MEMBER",
    "SHUT_DOWN_TEAM",
    "STOP_MEMBER",
    "Transition",
]

S = TypeVar("S", bound=StrEnum)

Refusal = str | Callable[[str | None], str]
"""What a refused transition says: a sentence, or one made from the state the row is in."""


@dataclass(frozen=True)
class Transition(Generic[S]):
    """A named step of one lifecycle: it moves `field` of a row to `to`, only from `only_from`.

    `None` in `only_from` stands for a row that has no state yet (a member that has proposed
    no plan)."""

    name: str
    to: S
    only_from: frozenset[S | None]
    field: str = "status"

    def allows(self, state: str | None) -> bool:
        """Whether a row in `state` may take this step."""
        return state in self.only_from

    def apply(self, row: object, refusal: Refusal | None = None) -> None:
        """Move `row` on, or raise `StateError` (with `refusal`, if given) if its state does
        not allow this step."""
        state = getattr(row, self.field)
        if not self.allows(state):
            if refusal is None:
                allowed = ", ".join(sorted("none" if s is None else s.value for s in self.only_from))
                raise StateError(f"cannot {self.name}: it is {state or 'none'}, and only {allowed} may")
            raise StateError(refusal(state) if callable(refusal) else refusal)
        setattr(row, self.field, self.to.value)


def _from(*states: S | None) -> frozenset[S | None]:
    return frozenset(states)


def _but(excluded: Iterable[S], every: Iterable[S]) -> frozenset[S | None]:
    return frozenset(s for s in every if s not in set(excluded))


SHUT_DOWN_TEAM = Transition("shut the team down", TeamStatus.SHUT_DOWN, _from(TeamStatus.ACTIVE))

LIVE_MEMBER = frozenset({MemberStatus.STARTING, MemberStatus.BUSY, MemberStatus.IDLE, MemberStatus.READY})
"""A member whose loop may still take turns."""

PREPARE_MEMBER = Transition(
    "prepare the member", MemberStatus.STARTING, _from(MemberStatus.STARTING, MemberStatus.READY, MemberStatus.IDLE)
)
BEGIN_TURN = Transition("begin a turn", MemberStatus.BUSY, frozenset(LIVE_MEMBER))
REST_MEMBER = Transition("let the member wait for messages", MemberStatus.IDLE, frozenset(LIVE_MEMBER))
INTERRUPT_MEMBER = Transition(
    "mark the member interrupted", MemberStatus.READY, _from(MemberStatus.STARTING, MemberStatus.BUSY)
)
FAIL_MEMBER = Transition("mark the member failed", MemberStatus.FAILED, frozenset(LIVE_MEMBER))
STOP_MEMBER = Transition("stop the member", MemberStatus.STOPPED, _but([MemberStatus.STOPPED], MemberStatus))

CLAIM_TASK = Transition("claim the task", TaskStatus.CLAIMED, _from(TaskStatus.OPEN))
FINISH_TASK = Transition("finish the task", TaskStatus.DONE, _from(TaskStatus.CLAIMED))
FAIL_TASK = Transition("fail the task", TaskStatus.FAILED, _from(TaskStatus.CLAIMED))

PROPOSE_PLAN = Transition(
    "propose a plan", PlanStatus.PENDING, _from(None, PlanStatus.PENDING, PlanStatus.REJECTED), field="plan_status"
)
APPROVE_PLAN = Transition("approve the plan", PlanStatus.APPROVED, _from(PlanStatus.PENDING), field="plan_status")
REJECT_PLAN = Transition("reject the plan", PlanStatus.REJECTED, _from(PlanStatus.PENDING), field="plan_status")
