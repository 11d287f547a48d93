"""Team tools: a lead creates a team and spawns members; members and lead message each other,
share a task list and agree on plans.

The tools a member also calls in process (an `llm` member's team tools) take their parameters
from `dockyard.runtime.work.teams.membertools`, where each is declared once for both."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from dockyard.runtime.substrate.actions import Action, Scope, Toolset
from dockyard.runtime.substrate.listings import DEFAULT_LIMIT, MAX_LIMIT, TeamPage
from dockyard.runtime.substrate.models import (
    Inbox,
    MemberInfo,
    MessagesSent,
    TaskInfo,
    TasksAdded,
    TeamForgotten,
    TeamInfo,
    TeamTasksPage,
    TeamView,
)
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import TeamStatus
from dockyard.runtime.work.teams.membertools import (
    Body,
    ClaimTaskId,
    Detail,
    Failed,
    OneTask,
    Plan,
    Recipient,
    Result,
    TaskId,
    TaskOffset,
)
from dockyard.tools._annotations import ADDITIVE, DESTRUCTIVE, DESTRUCTIVE_IDEMPOTENT, IDEMPOTENT, READ_ONLY, Reach
from dockyard.tools._context import EngineContext, any_of, authorized, engine
from dockyard.tools._errors import tool_errors
from dockyard.tools._progress import live
from dockyard.tools._toolbox import Toolbox

__all__ = ["register"]

TeamId = Annotated[
    str,
    Field(
        description="A team id (team_...) from team_create or team_list; members find theirs in DOCKYARD_TEAM_ID.",
        max_length=64,
    ),
]
_TEAM = [Scope.TEAM_LEAD, Scope.TEAM_MEMBER]
TEAM_LIST_TITLE = "List teams"


class NewTask(BaseModel):
    """A task to add: its title and, if it needs one, its detail."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=500)
    detail: str | None = Field(None, max_length=10_000)


async def _anyone(ctx: EngineContext, action: Action) -> Identity:
    return await any_of(ctx, _TEAM, action)


@tool_errors
async def team_create(
    ctx: EngineContext, name: Annotated[str, Field(min_length=1, max_length=100, description="A name for the team.")]
) -> TeamInfo:
    """Create an empty team that you lead. Add members with team_spawn, tasks with
    team_add_tasks; follow it with team_tasks."""
    who = await authorized(ctx, Scope.TEAM_LEAD, Action.TEAM_CREATE)
    return await engine(ctx).teams.create(who, name)


@tool_errors
async def team_spawn(
    ctx: EngineContext,
    team_id: TeamId,
    role: Annotated[
        str,
        Field(min_length=1, max_length=64, description="The member's role and name in the team, e.g. 'researcher'."),
    ],
    prompt: Annotated[
        str,
        Field(
            min_length=1,
            max_length=100_000,
            description="Its first task: for a 'script' runner the bash script it runs on every turn (messages on "
            "stdin); for a 'command' runner the text handed to its agent CLI; for an 'llm' runner the model's task.",
        ),
    ],
    runner: Annotated[
        str | None,
        Field(
            max_length=64,
            description="A runner profile from config (script, command or llm kind); default 'script'. "
            "capabilities lists them.",
        ),
    ] = None,
    isolation: Annotated[
        str,
        Field(
            description="'shared': work in the team's one sandbox with the other shared members (team_single_vm); 'own': a sandbox of its own (team_multi_vm)."
        ),
    ] = "own",
    plan_mode: Annotated[
        bool,
        Field(description="The member must propose a plan and get your approval (team_approve_plan) before it acts."),
    ] = False,
) -> MemberInfo:
    """Start a teammate and return at once (fire and forget): it gets a sandbox and its own
    token and takes its first turn on the prompt; afterwards every message to it wakes it for
    another turn. Watch it with team_tasks, talk to it with team_message."""
    who = await authorized(ctx, Scope.TEAM_LEAD, Action.TEAM_SPAWN, team_id)
    return await engine(ctx).teams.spawn(
        who, team_id, role=role, prompt=prompt, runner=runner, isolation=isolation, plan_mode=plan_mode
    )


@tool_errors
async def team_list(
    ctx: EngineContext,
    status: Annotated[
        list[TeamStatus] | None, Field(max_length=2, description="Only teams in these states; default all.")
    ] = None,
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT, description="Rows per page.")] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None, Field(max_length=2048, description="next_cursor from the page before; omit for the newest.")
    ] = None,
) -> TeamPage:
    """List your workspace's teams, newest first, one compact row each (id, name, status, lead,
    member count, open tasks); a member sees its own team. Filter by status and page with
    next_cursor; team_tasks shows one team in full."""
    who = await _anyone(ctx, Action.TEAM_LIST)
    return await engine(ctx).teams.list_page(who, [str(s) for s in status or []], limit, cursor)


@tool_errors
async def team_message(
    ctx: EngineContext,
    team_id: TeamId,
    to: Recipient,
    body: Body,
) -> MessagesSent:
    """Send a message to one member (any member may message any other) or to the lead. It lands
    in the recipient's inbox and wakes it at once if it is idle; `delivered` turns true when the
    recipient has processed it (see team_read). Messaging an interrupted member resumes it."""
    who = await _anyone(ctx, Action.TEAM_MESSAGE)
    return await engine(ctx).teams.message(who, team_id, to, body)


@tool_errors
async def team_broadcast(ctx: EngineContext, team_id: TeamId, body: Body) -> MessagesSent:
    """Send the same message to every other member of the team at once, waking each."""
    who = await _anyone(ctx, Action.TEAM_BROADCAST)
    return await engine(ctx).teams.broadcast(who, team_id, body)


@tool_errors
async def team_tasks(
    ctx: EngineContext,
    team_id: TeamId,
    detail: Detail = False,
    task_id: OneTask = None,
    offset: TaskOffset = 0,
) -> TeamTasksPage:
    """The team at a glance: every member's status (busy, idle, ready, ...), and the shared
    task list with status and owner. By default a summary: results, plans and outputs are
    previews of 200 characters; ask detail=true for the full text, or task_id for one task.
    A page fits the result budget (about 16 KB): when has_more, pass next_offset as offset.
    After a server restart it tells the lead which members were interrupted."""
    who = await _anyone(ctx, Action.TEAM_TASKS)
    return await engine(ctx).teams.tasks_page(who, team_id, detail=detail, task_id=task_id, offset=offset)


@tool_errors
async def team_read(ctx: EngineContext, team_id: TeamId) -> Inbox:
    """Your side of the team's messages: those sent to you, and those you sent with their
    delivery receipts."""
    who = await _anyone(ctx, Action.TEAM_READ)
    return await engine(ctx).teams.inbox(who, team_id)


@tool_errors
async def team_add_tasks(
    ctx: EngineContext, team_id: TeamId, tasks: Annotated[list[NewTask], Field(min_length=1, max_length=500)]
) -> TasksAdded:
    """Add open tasks to the team's shared list, for members to claim with team_claim."""
    who = await _anyone(ctx, Action.TEAM_ADD_TASKS)
    return await engine(ctx).teams.add_tasks(who, team_id, [(t.title, t.detail) for t in tasks])


@tool_errors
async def team_claim(
    ctx: EngineContext,
    team_id: TeamId,
    task_id: ClaimTaskId = None,
) -> TaskInfo:
    """For members: claim an open task. Claims are atomic: a task has one owner, and a claim on
    a task that is taken or done is refused."""
    who = await _anyone(ctx, Action.TEAM_CLAIM)
    return await engine(ctx).teams.claim(who, team_id, task_id)


@tool_errors
async def team_complete(
    ctx: EngineContext,
    team_id: TeamId,
    task_id: TaskId,
    result: Result,
    failed: Failed = False,
) -> TaskInfo:
    """For members: finish a task you claimed, as done (or failed) with its result."""
    who = await _anyone(ctx, Action.TEAM_COMPLETE)
    return await engine(ctx).teams.complete(who, team_id, task_id, result, failed)


@tool_errors
async def team_propose_plan(ctx: EngineContext, team_id: TeamId, plan: Plan) -> MemberInfo:
    """For members in plan mode: hand your plan to the lead. Until the lead approves it you may
    only read and use the team tools; a rejection comes back as a message with feedback."""
    who = await _anyone(ctx, Action.TEAM_PROPOSE_PLAN)
    return await engine(ctx).teams.propose_plan(who, team_id, plan)


@tool_errors
async def team_approve_plan(
    ctx: EngineContext,
    team_id: TeamId,
    member: Annotated[str, Field(min_length=1, max_length=64, description="The member's role (or id).")],
    approve: Annotated[bool, Field(description="True to approve, false to reject.")],
    feedback: Annotated[
        str | None, Field(max_length=100_000, description="What to change (with a rejection) or to keep in mind.")
    ] = None,
) -> MemberInfo:
    """For the lead: approve a member's pending plan (it may act from its next turn) or reject it
    with feedback (it revises and proposes again). The answer wakes the member."""
    who = await authorized(ctx, Scope.TEAM_LEAD, Action.TEAM_APPROVE_PLAN, team_id)
    return await engine(ctx).teams.approve_plan(who, team_id, member, approve, feedback)


@tool_errors
async def team_shutdown(ctx: EngineContext, team_id: TeamId) -> TeamView:
    """For the lead: stop every member (a running turn is killed), revoke their tokens and give
    their sandboxes back to the pool. The team's messages and tasks stay readable."""
    who = await authorized(ctx, Scope.TEAM_LEAD, Action.TEAM_SHUTDOWN, team_id)
    async with live(ctx):  # heartbeats while the members stop
        return await engine(ctx).teams.shutdown(who, team_id)


@tool_errors
async def team_cleanup(ctx: EngineContext, team_id: TeamId) -> TeamForgotten:
    """For the lead: shut the team down if needed, then forget it: members, inboxes, tasks.
    The audit log keeps the record of everything it did."""
    who = await authorized(ctx, Scope.TEAM_LEAD, Action.TEAM_CLEANUP, team_id)
    async with live(ctx):  # heartbeats while the members stop and their sandboxes go
        return await engine(ctx).teams.cleanup(who, team_id)


def register(tools: Toolbox) -> None:
    """Add the team tools. A message or a plan's answer wakes a member, whose turn runs code."""
    T, lead, anyone, wakes = Toolset.TEAM, [Scope.TEAM_LEAD], _TEAM, Reach.RUNNERS
    tools.add(team_create, T, "Create a team", ADDITIVE, lead)
    tools.add(team_spawn, T, "Start a teammate", DESTRUCTIVE, lead, reach=wakes)
    tools.add(team_message, T, "Message a teammate", DESTRUCTIVE, anyone, reach=wakes)
    tools.add(team_broadcast, T, "Message the whole team", DESTRUCTIVE, anyone, reach=wakes)
    tools.add(team_tasks, T, "Team status and tasks", READ_ONLY, anyone)
    # Reading is the lead's receipt for what it received: not read-only, but repeatable.
    tools.add(team_read, T, "Read team messages", IDEMPOTENT, anyone)
    tools.add(team_add_tasks, T, "Add team tasks", ADDITIVE, anyone)
    tools.add(team_claim, T, "Claim a team task", ADDITIVE, anyone)
    tools.add(team_complete, T, "Finish a team task", ADDITIVE, anyone)
    tools.add(team_propose_plan, T, "Propose a plan", ADDITIVE, anyone)
    tools.add(team_approve_plan, T, "Approve or reject a plan", DESTRUCTIVE, lead, reach=wakes)
    tools.add(team_shutdown, T, "Shut a team down", DESTRUCTIVE_IDEMPOTENT, lead)
    tools.add(team_cleanup, T, "Forget a team", DESTRUCTIVE_IDEMPOTENT, lead)
    tools.add(team_list, T, TEAM_LIST_TITLE, READ_ONLY, anyone)
