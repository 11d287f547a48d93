"""MCP for programs inside a sandbox: each dockyard-bridge session is served like a stdio client.

A process in a sandbox runs `dockyard-bridge`; its bytes arrive over the sandbox's control link
(see dockyard.runtime.supervisor) and are served by this server's tools, acting as the owner of
the sandbox the bridge runs in. The identity comes from the link, never from the bridge, so a
program in a sandbox cannot claim to be anyone else. A runtime nobody has claimed gets nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from mcp.server.mcpserver import MCPServer
from mcp.server.runner import serve_dual_era_loop
from mcp.server.stdio import stdio_server

from dockyard.runtime.engine import Engine
from dockyard.runtime.supervisor import BridgeSession
from dockyard.tools._context import acting_as

__all__ = ["serve_bridge"]

log = logging.getLogger(__name__)

_MAX_LINE = 16 << 20


class _Lines:
    """A bridge session's bytes as the text lines a stdio transport reads."""

    def __init__(self, session: BridgeSession) -> None:
        self._session = session

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        pending = bytearray()
        async for chunk in self._session.incoming:
            pending += chunk
            while (end := pending.find(b"\n")) >= 0:
                yield pending[:end].decode("utf-8", errors="replace")
                del pending[: end + 1]
            if len(pending) > _MAX_LINE:
                log.warning("bridge session on %s sent a line over %d bytes; closing it", self._session.runtime_id, _MAX_LINE)
                return
        if pending.strip():
            yield pending.decode("utf-8", errors="replace")


class _Writer:
    """What a stdio transport writes, sent back to the process in the sandbox."""

    def __init__(self, session: BridgeSession) -> None:
        self._session = session

    async def write(self, text: str) -> None:
        await self._session.send(text.encode())

    async def flush(self) -> None:
        return None


async def serve_bridge(server: MCPServer[Engine], engine: Engine, session: BridgeSession) -> None:
    """Serve one bridge session as the owner of the sandbox it comes from."""
    owner = await engine.sandboxes.owner_of_runtime(session.runtime_id)
    if owner is None:
        log.info("bridge session from unclaimed runtime %s refused", session.runtime_id)
        return
    acting_as.set(owner)  # this task's context, inherited by every handler of the session
    lowlevel = server._lowlevel_server  # noqa: SLF001 - the SDK serves one connection through it
    async with stdio_server(stdin=_Lines(session), stdout=_Writer(session)) as (read, write):  # type: ignore[arg-type]
        await serve_dual_era_loop(
            lowlevel,
            read,
            write,
            lifespan_state=engine,
            init_options=lowlevel.create_initialization_options(),
        )
