"""The resources a client may read and subscribe to, and who may hear of their changes.

    dockyard://dispatches/{id}       a dispatch's status and result (its resource is in `dispatch`)
    dockyard://teams/{id}            a team at a glance: members, plans, the task list (team_tasks)
    dockyard://teams/{id}/inbox      the reader's messages in that team and its receipts (team_read)
    dockyard://sandboxes/{id}        a sandbox's status (running, destroyed, lost), limits and ports

A subscription is allowed only where reading is: `check` runs the same scope and workspace
checks as a read, without reading (a lead's read of its inbox is the receipt of what it
received; subscribing is not). `may_hear` says which identities a change of a URI reaches.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError
from pydantic import BaseModel

from dockyard.runtime.substrate.actions import Action, Scope
from dockyard.runtime.substrate.errors import DockyardError, NotFoundError
from dockyard.runtime.substrate.models import Inbox, SandboxInfo, TeamView
from dockyard.runtime.substrate.settings import Identity
from dockyard.tools._context import EngineContext, any_of, authorized, engine

__all__ = [
    "DISPATCH",
    "INBOX",
    "SANDBOX",
    "SUBSCRIBABLE",
    "TEAM",
    "Watched",
    "check",
    "register",
    "watched",
]

DISPATCH = "dockyard://dispatches/{}"
TEAM = "dockyard://teams/{}"
INBOX = "dockyard://teams/{}/inbox"
SANDBOX = "dockyard://sandboxes/{}"
SUBSCRIBABLE = ", ".join(t.format("{id}") for t in (DISPATCH, TEAM, INBOX, SANDBOX))

_TEAM_SCOPES = [Scope.TEAM_LEAD, Scope.TEAM_MEMBER]
_SANDBOX_SCOPES = [Scope.SANDBOX_CREATE, Scope.SANDBOX_EXEC, Scope.SANDBOX_FILES]
_ID = r"([A-Za-z0-9_-]{1,64})"


def _team_reader(who: Identity) -> bool:
    return any(who.allows(scope) for scope in _TEAM_SCOPES)


def _sandbox_reader(sandbox_id: str) -> Callable[[Identity], bool]:
    def may_hear(who: Identity) -> bool:
        return who.sandbox_id in (None, sandbox_id) and any(who.allows(scope) for scope in _SANDBOX_SCOPES)

    return may_hear


def _dispatch_reader(who: Identity) -> bool:
    return who.allows(Scope.DISPATCH_READ)


@dataclass(frozen=True)
class Watched:
    """A resource one can subscribe to: its kind, its id, and who may hear of its changes."""

    kind: str
    id: str
    may_hear: Callable[[Identity], bool]


_PATTERNS = [
    (re.compile(r"dockyard://dispatches/" + _ID), "dispatch"),
    (re.compile(r"dockyard://teams/" + _ID), "team"),
    (re.compile(r"dockyard://teams/" + _ID + "/inbox"), "inbox"),
    (re.compile(r"dockyard://sandboxes/" + _ID), "sandbox"),
]


def watched(uri: str) -> Watched | None:
    """What `uri` names, if it is a resource one can subscribe to."""
    for pattern, kind in _PATTERNS:
        if (match := pattern.fullmatch(uri)) is not None:
            ident = match.group(1)
            if kind == "dispatch":
                return Watched(kind, ident, _dispatch_reader)
            if kind == "sandbox":
                return Watched(kind, ident, _sandbox_reader(ident))
            return Watched(kind, ident, _team_reader)
    return None


async def check(ctx: EngineContext, target: Watched) -> Identity:
    """The caller, if it may read `target` (as a read would check it); else the refusal is
    audited where a read's would be, and raised."""
    if target.kind == "dispatch":
        who = await authorized(ctx, Scope.DISPATCH_READ, Action.DISPATCH_READ, target.id)
        await engine(ctx).dispatches.get(who, target.id)
    elif target.kind == "sandbox":
        who = await any_of(ctx, _SANDBOX_SCOPES, Action.SANDBOX_LIST)
        await engine(ctx).sandboxes.get(who, target.id)
    else:
        action = Action.TEAM_TASKS if target.kind == "team" else Action.TEAM_READ
        who = await any_of(ctx, _TEAM_SCOPES, action)
        await engine(ctx).teams.may_read(who, target.id, action)
    return who


async def _json(read: Callable[[], Awaitable[BaseModel]]) -> str:
    """What `read` returns, as JSON; dockyard's errors as the SDK's resource errors."""
    try:
        return (await read()).model_dump_json()
    except NotFoundError as exc:
        raise ResourceNotFoundError(str(exc)) from exc
    except DockyardError as exc:
        raise ResourceError(str(exc)) from exc


async def team_resource(team_id: str, ctx: EngineContext) -> str:
    """A team at a glance, as JSON (as team_tasks). Subscribe to be told when it changes."""

    async def read() -> TeamView:
        who = await any_of(ctx, _TEAM_SCOPES, Action.TEAM_TASKS)
        return await engine(ctx).teams.view(who, team_id)

    return await _json(read)


async def inbox_resource(team_id: str, ctx: EngineContext) -> str:
    """Your messages in a team and the receipts of those you sent, as JSON (as team_read: the
    lead reading it is the receipt of what it received). Subscribe to hear of new messages."""

    async def read() -> Inbox:
        who = await any_of(ctx, _TEAM_SCOPES, Action.TEAM_READ)
        return await engine(ctx).teams.inbox(who, team_id)

    return await _json(read)


async def sandbox_resource(sandbox_id: str, ctx: EngineContext) -> str:
    """A sandbox's status (running, destroyed, lost), limits and ports, as JSON. Subscribe to
    be told when it is destroyed, expires or is lost."""

    async def read() -> SandboxInfo:
        who = await any_of(ctx, _SANDBOX_SCOPES, Action.SANDBOX_LIST)
        return await engine(ctx).sandboxes.get(who, sandbox_id)

    return await _json(read)


def register(server: MCPServer) -> None:
    """Add the team and sandbox resources to a server (the dispatch resource is dispatch's)."""
    server.resource(TEAM.format("{team_id}"), name="team", mime_type="application/json")(team_resource)
    server.resource(INBOX.format("{team_id}"), name="team_inbox", mime_type="application/json")(inbox_resource)
    server.resource(SANDBOX.format("{sandbox_id}"), name="sandbox", mime_type="application/json")(sandbox_resource)
