"""The MCP tool surface: one module per family, each tool a thin typed function."""
