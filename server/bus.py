"""Resource notifications that reach only those who may read the resource.

The SDK fans `subscriptions/listen` streams out through a bus; dockyard's bus remembers who
opened each stream (the bridge session's or HTTP token's identity, else the local operator)
and hands a workspace's events only to streams of that workspace whose token holds the scope
to read them and has not been revoked since. Events without tenant data (list changes) reach
every stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import anyio.lowlevel
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.subscriptions import ServerEvent

from dockyard.runtime.substrate.actions import Scope
from dockyard.runtime.substrate.settings import Identity
from dockyard.tools._context import CallerToken, acting_as

__all__ = ["WorkspaceBus"]

log = logging.getLogger(__name__)

Listener = Callable[[ServerEvent], None]


@dataclass
class _Stream:
    who: Identity
    listener: Listener
    live: bool = True


class WorkspaceBus:
    """A subscription bus that keeps each workspace's events inside it."""

    def __init__(self, operator: Identity) -> None:
        self._operator = operator
        self._streams: dict[object, _Stream] = {}

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Register a listen stream, as whoever is calling now."""
        key = object()
        self._streams[key] = _Stream(self._caller(), listener)

        def unsubscribe() -> None:
            self._streams.pop(key, None)

        return unsubscribe

    async def publish(self, event: ServerEvent) -> None:
        """An event without tenant data, to every stream."""
        self._deliver(event, lambda _: True)
        await anyio.lowlevel.checkpoint()

    async def publish_to(self, workspace_id: str, scope: Scope, event: ServerEvent) -> None:
        """A workspace's event, to that workspace's streams whose token holds `scope`."""
        self._deliver(event, lambda who: who.workspace_id == workspace_id and who.allows(scope))
        await anyio.lowlevel.checkpoint()

    def revoked(self, token_ids: set[str]) -> None:
        """Streams opened with these tokens hear nothing more."""
        for stream in self._streams.values():
            if stream.who.token_id in token_ids:
                stream.live = False

    def _deliver(self, event: ServerEvent, may_read: Callable[[Identity], bool]) -> None:
        for stream in list(self._streams.values()):
            if not stream.live or not may_read(stream.who):
                continue
            try:
                stream.listener(event)
            except Exception:  # one stream's trouble must not starve the others
                log.exception("a subscription listener failed; continuing")

    def _caller(self) -> Identity:
        if (bridged := acting_as.get()) is not None:
            return bridged
        token = get_access_token()
        if isinstance(token, CallerToken):
            return token.identity
        if token is not None:  # authenticated by something that is not a dockyard token
            return Identity(workspace_id="", user_id="", scopes=[])
        return self._operator
