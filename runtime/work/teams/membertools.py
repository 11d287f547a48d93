"""The team tools a member calls, declared once: their parameters, the `llm` runner's specs
derived from them, and the call an `llm` member makes in process, as itself.

Each member-facing tool is a model of its arguments. The MCP tools of the same names
(`dockyard.tools.team`) take their parameters from the same types below, so a member that
calls a tool in process and a client that calls it over MCP see the same parameters.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any, ClassVar, Protocol

from pydantic import BaseModel, Field, ValidationError

from dockyard.runtime.substrate.settings import Identity

__all__ = [
    "MEMBER_TOOLS",
    "PLAN_BLOCKED",
    "TEAM_TOOLS",
    "Body",
    "ClaimTaskId",
    "Detail",
    "Failed",
    "MemberTool",
    "OneTask",
    "Plan",
    "Recipient",
    "Result",
    "TaskId",
    "TaskOffset",
    "TeamTools",
    "call_team_tool",
]

Recipient = Annotated[str, Field(min_length=1, max_length=64, description="A member's role (or id), or 'lead'.")]
# Bodies are checked against the server's cap (teams.message_max_bytes) with a clear error;
# this bound only keeps absurd requests out.
Body = Annotated[str, Field(min_length=1, max_length=4_000_000, description="The text to send.")]
ClaimTaskId = Annotated[str | None, Field(max_length=64, description="The task to claim; default the oldest open one.")]
TaskId = Annotated[str, Field(max_length=64, description="A task you claimed.")]
Result = Annotated[str, Field(min_length=1, max_length=4_000_000, description="What came of it.")]
Failed = Annotated[bool, Field(description="True if the task could not be done; result says why.")]
Plan = Annotated[str, Field(min_length=1, max_length=4_000_000, description="Your plan.")]
Detail = Annotated[
    bool, Field(description="Every task's detail and whole result, and members' whole plans and outputs.")
]
OneTask = Annotated[str | None, Field(max_length=64, description="Only this task, in full.")]
TaskOffset = Annotated[int, Field(ge=0, description="Start the task list here (a page's next_offset).")]

PLAN_BLOCKED = {"exec", "write_file"}
"""The sandbox tools an `llm` member in plan mode may not use until its plan is approved."""


class TeamTools(Protocol):
    """The team's tools as a member calls them (the team service)."""

    async def message(self, who: Identity, team_id: str, to: str, body: str) -> BaseModel: ...
    async def broadcast(self, who: Identity, team_id: str, body: str) -> BaseModel: ...
    async def tasks_page(
        self, who: Identity, team_id: str, *, detail: bool, task_id: str | None, offset: int
    ) -> BaseModel: ...
    async def inbox(self, who: Identity, team_id: str) -> BaseModel: ...
    async def claim(self, who: Identity, team_id: str, task_id: str | None) -> BaseModel: ...
    async def complete(self, who: Identity, team_id: str, task_id: str, result: str, failed: bool) -> BaseModel: ...
    async def propose_plan(self, who: Identity, team_id: str, plan: str) -> BaseModel: ...


class MemberTool(BaseModel):
    """A team tool's arguments as a member gives them (its team is the member's own); the class
    docstring is the tool's description for the model."""

    name: ClassVar[str]

    async def call(self, teams: TeamTools, who: Identity, team_id: str) -> BaseModel:
        """Carry the call out as `who`, in its team."""
        raise NotImplementedError

    @classmethod
    def spec(cls) -> dict[str, Any]:
        """The tool as the `llm` runner offers it: an OpenAI-style function spec."""
        parameters = cls.model_json_schema()
        parameters.pop("title", None)
        parameters.pop("description", None)
        description = inspect.cleandoc(cls.__doc__ or "")
        return {
            "type": "function",
            "function": {"name": cls.name, "description": description, "parameters": parameters},
        }


class TeamMessage(MemberTool):
    """Send a message to one teammate (by role) or to 'lead'."""

    name: ClassVar[str] = "team_message"
    to: Recipient
    body: Body

    async def call(self, teams: TeamTools, who: Identity, team_id: str) -> BaseModel:
        return await teams.message(who, team_id, self.to, self.body)


class TeamBroadcast(MemberTool):
    """Send a message to every other member of the team."""

    name: ClassVar[str] = "team_broadcast"
    body: Body

    async def call(self, teams: TeamTools, who: Identity, team_id: str) -> BaseModel:
        return await teams.broadcast(who, team_id, self.body)


class TeamTasks(MemberTool):
    """The team's members (status, last output) and its shared task list: a summary with
    200-character previews unless detail=true, or one task in full by task_id; when has_more,
    pass next_offset as offset for the next tasks."""

    name: ClassVar[str] = "team_tasks"
    detail: Detail = False
    task_id: OneTask = None
    offset: TaskOffset = 0

    async def call(self, teams: TeamTools, who: Identity, team_id: str) -> BaseModel:
        return await teams.tasks_page(who, team_id, detail=self.detail, task_id=self.task_id, offset=self.offset)


class TeamRead(MemberTool):
    """Messages to you, and the messages you sent with whether each was delivered."""

    name: ClassVar[str] = "team_read"

    async def call(self, teams: TeamTools, who: Identity, team_id: str) -> BaseModel:
        return await teams.inbox(who, team_id)


class TeamClaim(MemberTool):
    """Claim an open task (by task_id, or the next open one); only one member gets it."""

    name: ClassVar[str] = "team_claim"
    task_id: ClaimTaskId = None

    async def call(self, teams: TeamTools, who: Identity, team_id: str) -> BaseModel:
        return await teams.claim(who, team_id, self.task_id or None)


class TeamComplete(MemberTool):
    """Finish a task you claimed with its result (failed=true if it could not be done)."""

    name: ClassVar[str] = "team_complete"
    task_id: TaskId
    result: Result
    failed: Failed = False

    async def call(self, teams: TeamTools, who: Identity, team_id: str) -> BaseModel:
        return await teams.complete(who, team_id, self.task_id, self.result, self.failed)


class TeamProposePlan(MemberTool):
    """Plan mode: propose your plan to the lead and wait for approval."""

    name: ClassVar[str] = "team_propose_plan"
    plan: Plan

    async def call(self, teams: TeamTools, who: Identity, team_id: str) -> BaseModel:
        return await teams.propose_plan(who, team_id, self.plan)


MEMBER_TOOLS: dict[str, type[MemberTool]] = {
    tool.name: tool
    for tool in (TeamMessage, TeamBroadcast, TeamTasks, TeamRead, TeamClaim, TeamComplete, TeamProposePlan)
}
"""The team tools an `llm` member has, by name."""

TEAM_TOOLS: list[dict[str, Any]] = [tool.spec() for tool in MEMBER_TOOLS.values()]
"""Their specs, as the `llm` runner offers them next to the sandbox tools."""


async def call_team_tool(teams: TeamTools, who: Identity, team_id: str, name: str, arguments: dict[str, Any]) -> str:
    """A team tool called by an `llm` member, in process, as that member; its result as JSON,
    or what was wrong with the arguments, for the model to correct."""
    try:
        call = MEMBER_TOOLS[name].model_validate(arguments)
    except ValidationError as exc:
        wrong = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'arguments'}: {error['msg']}" for error in exc.errors()
        )
        return f"error: the arguments of {name} are not valid ({wrong})"
    return (await call.call(teams, who, team_id)).model_dump_json(exclude_none=True)
