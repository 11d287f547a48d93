"""Pool tools: how much warm capacity each runtime template has and how claims are served."""

from __future__ import annotations

from pydantic import BaseModel

from dockyard.runtime.substrate.actions import Action, Scope, Toolset
from dockyard.runtime.substrate.models import PoolInfo
from dockyard.tools._annotations import READ_ONLY
from dockyard.tools._context import EngineContext, authorized, engine
from dockyard.tools._errors import tool_errors
from dockyard.tools._toolbox import Toolbox

__all__ = ["register"]


class PoolStatusResult(BaseModel):
    """Every warm pool, one per runtime template."""

    pools: list[PoolInfo]


@tool_errors
async def pool_status(ctx: EngineContext) -> PoolStatusResult:
    """Show each template's warm pool: ready (warm), in use (claimed), starting and being wiped
    runtimes, its min/max and current target, claims waiting in its queue, how many recent
    claims were served warm vs cold, and claim latency percentiles in milliseconds."""
    await authorized(ctx, Scope.POOL_READ, Action.POOL_STATUS)
    return PoolStatusResult(pools=await engine(ctx).pool_status())


def register(tools: Toolbox) -> None:
    """Add the pool tools."""
    tools.add(pool_status, Toolset.ADMIN, "Warm pool status", READ_ONLY, [Scope.POOL_READ])
