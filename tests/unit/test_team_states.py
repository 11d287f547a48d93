"""The lifecycles of teams, members, tasks and plans: every transition from every state, allowed
or refused, on real rows and without a store (the transitions only read and set a field)."""

from __future__ import annotations

from typing import Any

import pytest

from dockyard.runtime.substrate.errors import InvalidRequestError, StateError
from dockyard.runtime.substrate.store import Member, MemberStatus, PlanStatus, TaskStatus, Team, TeamStatus, TeamTask
from dockyard.runtime.work.teams.states import (
    APPROVE_PLAN,
    BEGIN_TURN,
    CLAIM_TASK,
    FAIL_MEMBER,
    FAIL_TASK,
    FINISH_TASK,
    INTERRUPT_MEMBER,
    PREPARE_MEMBER,
    PROPOSE_PLAN,
    REJECT_PLAN,
    REST_MEMBER,
    SHUT_DOWN_TEAM,
    STOP_MEMBER,
    Transition,
)
from dockyard.runtime.work.teams.views import interrupted_notice

TEAM_STATES = ["active", "shut down"]
MEMBER_STATES = ["starting", "busy", "idle", "ready", "stopped", "failed"]
TASK_STATES = ["open", "claimed", "done", "failed"]
PLAN_STATES = [None, "pending", "approved", "rejected"]

# Each transition, the states it must move from (written out here, not read from the
# transition), and where it goes.
LIFECYCLES: list[tuple[str, Transition[Any], list[Any], set[Any], str]] = [
    ("team shut down", SHUT_DOWN_TEAM, TEAM_STATES, {"active"}, "shut down"),
    ("member prepared", PREPARE_MEMBER, MEMBER_STATES, {"starting", "ready", "idle"}, "starting"),
    ("member turn begun", BEGIN_TURN, MEMBER_STATES, {"starting", "busy", "idle", "ready"}, "busy"),
    ("member at rest", REST_MEMBER, MEMBER_STATES, {"starting", "busy", "idle", "ready"}, "idle"),
    ("member interrupted", INTERRUPT_MEMBER, MEMBER_STATES, {"starting", "busy"}, "ready"),
    ("member failed", FAIL_MEMBER, MEMBER_STATES, {"starting", "busy", "idle", "ready"}, "failed"),
    ("member stopped", STOP_MEMBER, MEMBER_STATES, {"starting", "busy", "idle", "ready", "failed"}, "stopped"),
    ("task claimed", CLAIM_TASK, TASK_STATES, {"open"}, "claimed"),
    ("task finished", FINISH_TASK, TASK_STATES, {"claimed"}, "done"),
    ("task failed", FAIL_TASK, TASK_STATES, {"claimed"}, "failed"),
    ("plan proposed", PROPOSE_PLAN, PLAN_STATES, {None, "pending", "rejected"}, "pending"),
    ("plan approved", APPROVE_PLAN, PLAN_STATES, {"pending"}, "approved"),
    ("plan rejected", REJECT_PLAN, PLAN_STATES, {"pending"}, "rejected"),
]

ALLOWED = [
    pytest.param(t, state, to, id=f"{name} from {state or 'no plan'}")
    for name, t, states, allowed, to in LIFECYCLES
    for state in states
    if state in allowed
]
REFUSED = [
    pytest.param(t, state, id=f"{name} from {state or 'no plan'}")
    for name, t, states, allowed, _ in LIFECYCLES
    for state in states
    if state not in allowed
]


def row_in(transition: Transition[Any], state: str | None) -> Any:
    """A real row of the transition's lifecycle, in `state`."""
    if transition is SHUT_DOWN_TEAM:
        return Team(id="team_1", name="t", workspace_id="w", project_id="p", user_id="u", status=state)
    if transition in (CLAIM_TASK, FINISH_TASK, FAIL_TASK):
        return TeamTask(id="task_1", team_id="team_1", title="t", created_by="lead", status=state)
    member = Member(
        id="mem_1", team_id="team_1", role="r", runner="script", isolation="own", prompt="p", plan_mode=True
    )
    setattr(member, transition.field, state)
    return member


@pytest.mark.parametrize(("transition", "state", "to"), ALLOWED)
def test_an_allowed_transition_moves_the_row_and_stores_the_same_string_as_before(
    transition: Transition[Any], state: str | None, to: str
) -> None:
    row = row_in(transition, state)
    transition.apply(row)
    stored = getattr(row, transition.field)
    assert stored == to and type(stored) is str  # a plain string in the row, as the schema has always held


@pytest.mark.parametrize(("transition", "state"), REFUSED)
def test_a_refused_transition_raises_a_state_error_and_leaves_the_row_as_it_was(
    transition: Transition[Any], state: str | None
) -> None:
    row = row_in(transition, state)
    with pytest.raises(StateError) as refused:
        transition.apply(row)
    assert getattr(row, transition.field) == state
    assert isinstance(refused.value, InvalidRequestError)  # told to the caller as a bad request
    assert f"it is {state or 'none'}" in str(refused.value)


def test_a_refusal_says_what_the_caller_gave_it_with_the_state_the_row_is_in() -> None:
    task = row_in(CLAIM_TASK, "done")
    with pytest.raises(StateError) as refused:
        CLAIM_TASK.apply(task, lambda state: f"task 'task_1' is {state}; claim an open one")
    assert str(refused.value) == "task 'task_1' is done; claim an open one"
    plan = row_in(PROPOSE_PLAN, "approved")
    with pytest.raises(StateError) as refused:
        PROPOSE_PLAN.apply(plan, "your plan is already approved: go ahead")
    assert str(refused.value) == "your plan is already approved: go ahead"


def test_the_states_are_stored_as_the_strings_stores_already_hold() -> None:
    assert [s.value for s in TeamStatus] == TEAM_STATES
    assert [s.value for s in MemberStatus] == MEMBER_STATES
    assert [s.value for s in TaskStatus] == TASK_STATES
    assert [s.value for s in PlanStatus] == [s for s in PLAN_STATES if s is not None]


def test_the_restart_notice_names_the_ready_members_by_role_and_nobody_once_none_is_ready() -> None:
    def member(role: str, status: str) -> Member:
        return Member(
            id=f"mem_{role}", team_id="team_1", role=role, runner="script", isolation="own", prompt="p", status=status
        )

    team = [member("watcher", "idle"), member("tester", "ready"), member("builder", "ready"), member("gone", "stopped")]
    assert (
        interrupted_notice(team)
        == "Server was restarted. Teammates interrupted: builder, tester. Use team_message to resume."
    )
    for row in team:
        if row.status == "ready":
            BEGIN_TURN.apply(row)  # a message resumed it
    assert interrupted_notice(team) is None
