"""How a tool reaches the engine and learns who is calling."""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import Context

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.actions import Action, Scope
from dockyard.runtime.substrate.settings import Identity

__all__ = [
    "CallerToken",
    "EngineContext",
    "acting_as",
    "any_of",
    "authorized",
    "caller",
    "caller_as",
    "calling",
    "current",
    "engine",
]

EngineContext = Context[Engine, Any]

# Set by a transport that knows its caller better than "the operator": a bridge session from
# inside a sandbox acts as that sandbox's owner.
acting_as: ContextVar[Identity | None] = ContextVar("dockyard_acting_as", default=None)


def engine(ctx: EngineContext) -> Engine:
    """The engine opened by the server's lifespan."""
    return ctx.request_context.lifespan_context


class CallerToken(AccessToken):
    """A verified bearer token with the dockyard identity it acts as."""

    identity: Identity


def caller(ctx: EngineContext) -> Identity:
    """Who is calling: a bridge session's sandbox, an HTTP request's token, else the operator."""
    return calling(engine(ctx))


def calling(opened: Engine) -> Identity:
    """Who is calling, for a handler that has the engine but no tool context (a request
    method of an extension): the same answer as `caller`."""
    return caller_as(opened.operator)


def caller_as(operator: Identity) -> Identity:
    """Who the request being served comes from, where `operator` is the local operator (for
    a tool listing, which has neither a tool context nor the engine)."""
    if (bridged := acting_as.get()) is not None:
        return bridged
    token = get_access_token()
    if isinstance(token, CallerToken):
        return token.identity
    return operator


async def current(
    ctx: EngineContext,
    action: Action,
) -> Identity:
    """The caller, if the token it acts with is still live (a session opened with a token that
    was revoked since is refused); else the refusal is audited and raised."""
    return await engine(ctx).tokens.live(caller(ctx), action)


async def authorized(
    ctx: EngineContext,
    scope: Scope,
    action: Action,
    target: str | None = None,
) -> Identity:
    """The caller, if their token is live and holds `scope`; else the refusal is audited and raised."""
    return await engine(ctx).tokens.require(caller(ctx), scope, action, target)


async def any_of(
    ctx: EngineContext,
    scopes: Sequence[Scope],
    action: Action,
) -> Identity:
    """The caller, if their token holds at least one of `scopes` (for read-only listings)."""
    who = await current(ctx, action)
    if any(who.allows(scope) for scope in scopes):
        return who
    return await engine(ctx).tokens.require(who, scopes[0], action)
