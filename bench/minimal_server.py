"""The smallest MCP server on the same SDK, served over stdio: the baseline of the server's memory."""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

server = MCPServer("minimal")


@server.tool()
def whoami() -> str:
    """Say who is calling."""
    return "nobody"


if __name__ == "__main__":
    server.run("stdio")
