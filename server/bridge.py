"""MCP for programs inside a sandbox: each dockyard-bridge session is served like a stdio client.

A process in a sandbox runs `dockyard-bridge`; its bytes arrive over the sandbox's control link
(see dockyard.runtime.runtimes.supervisor) and are served by this server's tools, acting as the owner of
the sandbox the bridge runs in. The identity comes from the link, never from the bridge, so a
program in a sandbox cannot claim to be anyone else. A runtime nobody has claimed gets nothing.

A session may begin with one line that is not JSON-RPC, `{"dockyard_token": "<token>"}` (the
bridge sends it when DOCKYARD_TOKEN is set, as it is for a dispatch's runner). The session then
acts as that token, which must be valid and bound to the very sandbox the link comes from: a
token can only narrow what a program in the sandbox may do, never carry it to another sandbox.
Any other token closes the session unserved.

In a shared sandbox each team member runs as a Unix user of its own, and the supervisor says
which user a session's process runs as. A member's token serves only sessions from that
member's user, and a session from a member's user must present that member's token: a token a
teammate got hold of is useless from the teammate's user, and no member acts as the sandbox's
owner.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from mcp.server.mcpserver import MCPServer
from mcp.server.runner import serve_dual_era_loop
from mcp.server.stdio import stdio_server

from dockyard.config.images.sandbox.protocol import presented_token
from dockyard.runtime.engine import Engine
from dockyard.runtime.runtimes.provision import USER
from dockyard.runtime.runtimes.supervisor import BridgeSession
from dockyard.runtime.substrate.actions import Action
from dockyard.runtime.substrate.errors import DockyardError
from dockyard.runtime.substrate.settings import Identity
from dockyard.tools._context import acting_as

__all__ = ["serve_bridge"]

log = logging.getLogger(__name__)

_MAX_LINE = 16 << 20


class _Lines:
    """A bridge session's bytes as the text lines a stdio transport reads; the first line can
    be looked at before the transport starts, and is still read by it unless skipped."""

    def __init__(self, session: BridgeSession) -> None:
        self._session = session
        self._source = self._read()
        self._held: str | None = None

    async def peek(self) -> str | None:
        """The first line not yet read (None at the end), left in place."""
        if self._held is None:
            self._held = await anext(self._source, None)
        return self._held

    def skip(self) -> None:
        """Drop the line `peek` returned."""
        self._held = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        if self._held is not None:
            line, self._held = self._held, None
            yield line
        async for line in self._source:
            yield line

    async def _read(self) -> AsyncIterator[str]:
        pending = bytearray()
        async for chunk in self._session.incoming:
            pending += chunk
            while (end := pending.find(b"\n")) >= 0:
                yield pending[:end].decode("utf-8", errors="replace")
                del pending[: end + 1]
            if len(pending) > _MAX_LINE:
                log.warning(
                    "bridge session on %s sent a line over %d bytes; closing it", self._session.runtime_id, _MAX_LINE
                )
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


async def _acting(engine: Engine, session: BridgeSession, lines: _Lines) -> Identity | None:
    """Who the session acts as: the sandbox's owner, or the token it presented if that token is
    bound to this sandbox and to the session's Unix user; None to close it unserved."""
    owner = await engine.sandboxes.owner_of_runtime(session.runtime_id)
    if owner is None or owner.sandbox_id is None:
        log.info("bridge session from unclaimed runtime %s refused", session.runtime_id)
        return None
    token = presented_token(await lines.peek())
    if token is None:
        seat = (
            await engine.sandboxes.seat_holder(owner.sandbox_id, session.user)
            if session.user not in (None, USER)
            else None
        )
        if seat is None:
            return owner
        refusal = f"a session from {session.user}, the Unix user of team member {seat}, must present that member's DOCKYARD_TOKEN"
    else:
        lines.skip()
        checked = await _token_identity(engine, session, owner, token)
        if isinstance(checked, Identity):
            return checked
        refusal = checked
    log.warning("bridge session in sandbox %s closed: %s", owner.sandbox_id, refusal)
    await engine.tokens.deny(owner, Action.BRIDGE_TOKEN, refusal, owner.sandbox_id)  # an audited refusal
    return None


async def _token_identity(engine: Engine, session: BridgeSession, owner: Identity, token: str) -> Identity | str:
    """The identity of a token presented in this sandbox, from this session's Unix user; else why not."""
    try:
        identity = await engine.tokens.verify(token)
    except DockyardError as exc:
        return f"the bridge's DOCKYARD_TOKEN was refused: {exc}"
    if identity.sandbox_id is None or identity.sandbox_id != owner.sandbox_id:
        return f"the bridge's DOCKYARD_TOKEN ({identity.token_id}) is bound to {identity.sandbox_id or 'no sandbox'}, not this one"
    bound = await engine.sandboxes.unix_user(identity, owner.sandbox_id)
    if session.user is not None and session.user != bound:
        return (
            f"the bridge's DOCKYARD_TOKEN ({identity.token_id}) serves the Unix user {bound} here, not {session.user}"
        )
    return identity


async def serve_bridge(server: MCPServer[Engine], engine: Engine, session: BridgeSession) -> None:
    """Serve one bridge session as the sandbox's owner, or as the token it presented."""
    lines = _Lines(session)
    who = await _acting(engine, session, lines)
    if who is None:
        return
    acting_as.set(who)  # this task's context, inherited by every handler of the session
    lowlevel = server._lowlevel_server  # noqa: SLF001 - the SDK serves one connection through it
    async with stdio_server(stdin=lines, stdout=_Writer(session)) as (read, write):  # type: ignore[arg-type]  # the session stands in for the stdio files
        await serve_dual_era_loop(
            lowlevel,
            read,
            write,
            lifespan_state=engine,
            init_options=lowlevel.create_initialization_options(),
        )
