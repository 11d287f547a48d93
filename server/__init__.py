"""The dockyard MCP server process: CLI, settings loading, app wiring and transports."""
