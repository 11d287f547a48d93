"""Discovery: what this server offers the caller, before it has to guess or remember."""

from __future__ import annotations

from dockyard.runtime.substrate.actions import Action, Scope, Toolset
from dockyard.runtime.work.capabilities import Capabilities
from dockyard.tools._annotations import READ_ONLY
from dockyard.tools._context import EngineContext, current, engine
from dockyard.tools._errors import tool_errors
from dockyard.tools._toolbox import Toolbox

__all__ = ["register"]

CAPABILITIES_TITLE = "What this server offers you"


@tool_errors
async def capabilities(ctx: EngineContext) -> Capabilities:
    """What you can use here, as your token's scopes allow: dispatch modes (where each runs and
    what becomes of its sandbox), runner profiles (what `prompt` means for each), templates
    (kind, image, limits, pool size and your workspace's share of it), sandbox caps, quotas
    with your current use of each, and how programs inside a sandbox call these tools
    (dockyard-bridge, dockyard-call). Costs nothing; call it before choosing a mode, runner or
    template."""
    who = await current(ctx, Action.CAPABILITIES_READ)
    return await engine(ctx).capabilities(who)


def register(tools: Toolbox) -> None:
    """Add the discovery tools, with the server's other facts (pools, tokens, audit): listed to
    callers holding one of their scopes; any caller may still call it."""
    admin = [Scope.POOL_READ, Scope.TOKEN_MINT, Scope.AUDIT_READ]
    tools.add(capabilities, Toolset.ADMIN, CAPABILITIES_TITLE, READ_ONLY, admin)
