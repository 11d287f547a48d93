"""How a tool reaches the engine and learns who is calling."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from mcp.server.mcpserver import Context

from dockyard.runtime.engine import Engine
from dockyard.runtime.images import BuildState
from dockyard.runtime.settings import Identity

__all__ = ["EngineContext", "build_progress", "caller", "engine"]

EngineContext = Context[Engine, Any]


def engine(ctx: EngineContext) -> Engine:
    """The engine opened by the server's lifespan."""
    return ctx.request_context.lifespan_context


def caller(ctx: EngineContext) -> Identity:
    """Who is calling: the stdio operator, until tokens name someone else."""
    return engine(ctx).operator


def build_progress(ctx: EngineContext) -> Callable[[BuildState], Awaitable[None]]:
    """A callback that reports an image build as progress notifications."""
    ticks = 0

    async def notify(state: BuildState) -> None:
        nonlocal ticks
        ticks += 1
        await ctx.report_progress(ticks, None, f"building image '{state.recipe}': {state.describe()}")

    return notify
