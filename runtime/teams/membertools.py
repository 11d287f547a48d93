"""The team tools an `llm` member calls in process, as itself: their specs and their calls."""

from __future__ import annotations

from typing import Any, Protocol

from pydantic import BaseModel

from dockyard.runtime.settings import Identity

__all__ = ["PLAN_BLOCKED", "TEAM_TOOLS", "TeamTools", "call_team_tool"]

TEAM_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "team_message",
            "description": "Send a message to one teammate (by role) or to 'lead'.",
            "parameters": {
                "type": "object",
                "properties": {"to": {"type": "string"}, "body": {"type": "string"}},
                "required": ["to", "body"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "team_broadcast",
            "description": "Send a message to every other member of the team.",
            "parameters": {"type": "object", "properties": {"body": {"type": "string"}}, "required": ["body"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "team_tasks",
            "description": "The team's members (status, last output) and its shared task list.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "team_read",
            "description": "Messages to you, and the messages you sent with whether each was delivered.",
            "parameters": {"type": "object", "properties": {}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "team_claim",
            "description": "Claim an open task (by task_id, or the next open one); only one member gets it.",
            "parameters": {"type": "object", "properties": {"task_id": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "team_complete",
            "description": "Finish a task you claimed with its result (failed=true if it could not be done).",
            "parameters": {
                "type": "object",
                "properties": {
                    "task_id": {"type": "string"},
                    "result": {"type": "string"},
                    "failed": {"type": "boolean"},
                },
                "required": ["task_id", "result"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "team_propose_plan",
            "description": "Plan mode: propose your plan to the lead and wait for approval.",
            "parameters": {"type": "object", "properties": {"plan": {"type": "string"}}, "required": ["plan"]},
        },
    },
]

PLAN_BLOCKED = {"exec", "write_file"}
"""The sandbox tools an `llm` member in plan mode may not use until its plan is approved."""


class TeamTools(Protocol):
    """The team's tools as a member calls them (the team service)."""

    async def message(self, who: Identity, team_id: str, to: str, body: str) -> BaseModel: ...
    async def broadcast(self, who: Identity, team_id: str, body: str) -> BaseModel: ...
    async def view(self, who: Identity, team_id: str) -> BaseModel: ...
    async def inbox(self, who: Identity, team_id: str) -> BaseModel: ...
    async def claim(self, who: Identity, team_id: str, task_id: str | None) -> BaseModel: ...
    async def complete(self, who: Identity, team_id: str, task_id: str, result: str, failed: bool) -> BaseModel: ...
    async def propose_plan(self, who: Identity, team_id: str, plan: str) -> BaseModel: ...


async def call_team_tool(teams: TeamTools, who: Identity, team_id: str, name: str, arguments: dict[str, Any]) -> str:
    """A team tool called by an `llm` member, in process, as that member; its result as JSON."""

    def text(key: str) -> str:
        return str(arguments.get(key, ""))

    result: BaseModel
    if name == "team_message":
        result = await teams.message(who, team_id, text("to"), text("body"))
    elif name == "team_broadcast":
        result = await teams.broadcast(who, team_id, text("body"))
    elif name == "team_tasks":
        result = await teams.view(who, team_id)
    elif name == "team_read":
        result = await teams.inbox(who, team_id)
    elif name == "team_claim":
        result = await teams.claim(who, team_id, arguments.get("task_id") or None)
    elif name == "team_complete":
        result = await teams.complete(who, team_id, text("task_id"), text("result"), bool(arguments.get("failed")))
    else:
        result = await teams.propose_plan(who, team_id, text("plan"))
    return result.model_dump_json(exclude_none=True)
