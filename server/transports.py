"""How the server meets its clients. stdio today; the streamable HTTP transport joins here."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

__all__ = ["run_stdio"]


async def run_stdio(server: MCPServer) -> None:
    """Serve one client over stdin/stdout until it disconnects."""
    await server.run_stdio_async()
