"""Identity tools: who the caller is acting as (token minting and revocation come later)."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

from dockyard.runtime.settings import Identity
from dockyard.tools._context import EngineContext, caller
from dockyard.tools._errors import tool_errors

__all__ = ["register"]


@tool_errors
async def whoami(ctx: EngineContext) -> Identity:
    """Show who you are acting as: the workspace, project, user and run every sandbox you
    create and every action you take is attributed to. Costs nothing; safe to call any time."""
    return caller(ctx)


def register(server: MCPServer) -> None:
    """Add the identity tools to a server."""
    server.add_tool(
        whoami,
        annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False),
    )
