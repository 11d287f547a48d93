"""`resources/subscribe` and `resources/unsubscribe` for the handshake protocol versions
(2024-11-05 .. 2025-11-25), where a session is told of a resource's changes by
`notifications/resources/updated`.

A subscription is allowed only for a resource the caller may read: the same scope and
workspace checks as reading it (`dockyard.tools.resources.check`). Another workspace's id is
refused with the same words as an id that never was. The 2026-07-28 wire has no
`resources/subscribe` (the SDK answers it "Method not found" there); its clients use
`subscriptions/listen`, which hears the same changes through the same bus.
"""

from __future__ import annotations

from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, EmptyResult, SubscribeRequestParams, UnsubscribeRequestParams

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.errors import DockyardError
from dockyard.server.bus import SubscriptionLimitError, WorkspaceBus
from dockyard.tools.resources import SUBSCRIBABLE, check, watched

__all__ = ["serve_subscriptions"]


def _connection(ctx: ServerRequestContext[Engine]) -> Connection:
    # The SDK documents `Connection.exit_stack` as the place for per-connection cleanup, but a
    # request context reaches its connection only through its session.
    return ctx.session._connection  # noqa: SLF001 - see above


def serve_subscriptions(server: MCPServer[Engine], bus: WorkspaceBus) -> None:
    """Serve `resources/subscribe` and `resources/unsubscribe` (which also advertises
    `resources.subscribe` in the handshake's capabilities)."""

    async def subscribe(ctx: ServerRequestContext[Engine], params: SubscribeRequestParams) -> EmptyResult:
        uri = str(params.uri)
        target = watched(uri)
        if target is None:
            raise MCPError(
                INVALID_PARAMS, f"cannot subscribe to '{uri}': no such resource; subscribable: {SUBSCRIBABLE}"
            )
        try:
            who = await check(Context(request_context=ctx, mcp_server=server), target)
            bus.add(_connection(ctx), who, uri)
        except (DockyardError, SubscriptionLimitError) as exc:
            raise MCPError(INVALID_PARAMS, f"cannot subscribe to '{uri}': {exc}") from None
        return EmptyResult()

    async def unsubscribe(ctx: ServerRequestContext[Engine], params: UnsubscribeRequestParams) -> EmptyResult:
        bus.remove(_connection(ctx), str(params.uri))  # unsubscribing twice is no error
        return EmptyResult()

    lowlevel = server._lowlevel_server  # noqa: SLF001 - MCPServer has no public way to add a request handler
    lowlevel.add_request_handler("resources/subscribe", SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", UnsubscribeRequestParams, unsubscribe)
