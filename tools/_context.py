"""How a tool reaches the engine and learns who is calling."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from mcp.server.mcpserver import Context

from dockyard.runtime.engine import Engine
from dockyard.runtime.images import BuildState
from dockyard.runtime.settings import Identity

__all__ = ["EngineContext", "acting_as", "build_progress", "caller", "engine"]

EngineContext = Context[Engine, Any]

# Set by a transport that knows its caller better than "the operator": a bridge session from
# inside a sandbox acts as that sandbox's owner.
acting_as: ContextVar[Identity | None] = ContextVar("dockyard_acting_as", default=None)


def engine(ctx: EngineContext) -> Engine:
    """The engine opened by the server's lifespan."""
    return ctx.request_context.lifespan_context


def caller(ctx: EngineContext) -> Identity:
    """Who is calling: the identity a transport set for this session, else the operator."""
    return acting_as.get() or engine(ctx).operator


def build_progress(ctx: EngineContext) -> Callable[[BuildState], Awaitable[None]]:
    """A callback that reports an image build as progress notifications."""
    ticks = 0

    async def notify(state: BuildState) -> None:
        nonlocal ticks
        ticks += 1
        await ctx.report_progress(ticks, None, f"building image '{state.recipe}': {state.describe()}")

    return notify
