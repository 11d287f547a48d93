"""Discovery: what this server offers the caller, before it has to guess or remember."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

from dockyard.runtime.substrate.actions import Action
from dockyard.runtime.work.capabilities import Capabilities
from dockyard.tools._annotations import READ_ONLY
from dockyard.tools._context import EngineContext, current, engine
from dockyard.tools._errors import tool_errors

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


def register(server: MCPServer) -> None:
    """Add the discovery tools to a server."""
    server.add_tool(
        capabilities,
        title=CAPABILITIES_TITLE,
        annotations=READ_ONLY.model_copy(update={"title": CAPABILITIES_TITLE}),
    )
