"""Resource notifications that reach only those who may read the resource.

Two kinds of subscriber hear the same events:

- `subscriptions/listen` streams (2026-07-28): the SDK fans them out through this bus, which
  remembers who opened each stream (the bridge session's or HTTP token's identity, else the
  local operator).
- `resources/subscribe` (2024-11-05 .. 2025-11-25): a session subscribes to one URI at a time,
  after the server checked that the caller may read it; the session hears
  `notifications/resources/updated` for it until it unsubscribes or ends. A session holds at
  most `MAX_SESSION_SUBSCRIPTIONS`, and what it holds is dropped when it closes.

A workspace's event reaches only subscribers of that workspace whose identity may read the
resource (`may_read`) and whose token has not been revoked since (nor, for a 2025
subscription, expired). Events without tenant data
(list changes) reach every listen stream. Each 2025 session has a sender of its own: an event
marks its URI pending and wakes the sender, so a client that stops reading holds up neither
the publisher nor other sessions, and a burst of changes of one resource is sent once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc
import anyio.lowlevel
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.connection import Connection
from mcp.server.subscriptions import ServerEvent
from mcp.shared.subscriptions import ResourceUpdated

from dockyard.runtime.substrate.settings import Identity
from dockyard.tools._context import CallerToken, acting_as

__all__ = ["MAX_SESSION_SUBSCRIPTIONS", "SubscriptionLimitError", "WorkspaceBus"]

log = logging.getLogger(__name__)

MAX_SESSION_SUBSCRIPTIONS = 256
"""How many resources one 2025-era session may subscribe to at once."""

Listener = Callable[[ServerEvent], None]
MayRead = Callable[[Identity], bool]


class SubscriptionLimitError(Exception):
    """Raised when a session already holds `MAX_SESSION_SUBSCRIPTIONS` subscriptions."""


@dataclass
class _Stream:
    who: Identity
    listener: Listener
    live: bool = True


@dataclass(frozen=True)
class _Subscriber:
    """Who made a subscription, and until when its token holds (None: no expiry)."""

    who: Identity
    until: float | None

    def hears(self, may_read: MayRead) -> bool:
        return (self.until is None or time.time() < self.until) and may_read(self.who)


@dataclass
class _Session:
    """One 2025-era session's `resources/subscribe` subscriptions and its sender's state."""

    connection: Connection
    uris: dict[str, _Subscriber] = field(default_factory=dict)  # each subscription, as who made it
    pending: dict[str, None] = field(default_factory=dict)  # changed since the sender last ran
    wake: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)


class WorkspaceBus:
    """A subscription bus that keeps each workspace's events inside it."""

    def __init__(self, operator: Identity) -> None:
        self._operator = operator
        self._streams: dict[object, _Stream] = {}
        self._sessions: dict[Connection, _Session] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[None]:
        """Hold the senders of 2025-era sessions while the server runs."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                yield
            finally:
                self._tg = None
                tg.cancel_scope.cancel()

    # -- subscriptions/listen (2026-07-28) ----------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Register a listen stream, as whoever is calling now."""
        key = object()
        self._streams[key] = _Stream(self.caller(), listener)

        def unsubscribe() -> None:
            self._streams.pop(key, None)

        return unsubscribe

    # -- resources/subscribe (2024-11-05 .. 2025-11-25) ---------------------------------

    def add(self, connection: Connection, who: Identity, uri: str) -> None:
        """Subscribe a session to `uri` as `who` (who may read it: the caller checked); it
        hears nothing once the token it was made with expires."""
        session = self._sessions.get(connection)
        if session is None:
            if self._tg is None:
                raise RuntimeError("the subscription bus is not serving")
            session = self._sessions[connection] = _Session(connection)
            connection.exit_stack.callback(self._drop, connection)  # a closed session holds nothing
            self._tg.start_soon(self._send, session)
        if uri not in session.uris and len(session.uris) >= MAX_SESSION_SUBSCRIPTIONS:
            raise SubscriptionLimitError(
                f"this session already holds {MAX_SESSION_SUBSCRIPTIONS} subscriptions, the most one session "
                "may; unsubscribe (resources/unsubscribe) from some first"
            )
        token = get_access_token()
        session.uris[uri] = _Subscriber(who, float(token.expires_at) if token and token.expires_at else None)

    def remove(self, connection: Connection, uri: str) -> bool:
        """Unsubscribe a session from `uri`; False if it was not subscribed."""
        session = self._sessions.get(connection)
        if session is None or uri not in session.uris:
            return False
        del session.uris[uri]
        session.pending.pop(uri, None)
        return True

    def held(self, connection: Connection) -> list[str]:
        """The URIs a session is subscribed to."""
        session = self._sessions.get(connection)
        return list(session.uris) if session is not None else []

    def _drop(self, connection: Connection) -> None:
        if (session := self._sessions.pop(connection, None)) is not None:
            session.uris.clear()
            session.scope.cancel()

    async def _send(self, session: _Session) -> None:
        with session.scope:
            while True:
                await session.wake.wait()
                session.wake = anyio.Event()
                pending, session.pending = session.pending, {}
                for uri in pending:
                    if uri in session.uris:  # not unsubscribed meanwhile
                        await session.connection.send_resource_updated(uri)

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, event: ServerEvent) -> None:
        """An event without tenant data, to every listen stream."""
        self._deliver(event, lambda _: True)
        await anyio.lowlevel.checkpoint()

    async def publish_to(self, workspace_id: str, may_read: MayRead, event: ServerEvent) -> None:
        """A workspace's event, to that workspace's subscribers that `may_read` it."""

        def allowed(who: Identity) -> bool:
            return who.workspace_id == workspace_id and may_read(who)

        self._deliver(event, allowed)
        if isinstance(event, ResourceUpdated):
            for session in self._sessions.values():
                subscriber = session.uris.get(event.uri)
                if subscriber is not None and subscriber.hears(allowed):
                    session.pending[event.uri] = None
                    session.wake.set()
        await anyio.lowlevel.checkpoint()

    def revoked(self, token_ids: set[str]) -> None:
        """Streams and subscriptions opened with these tokens hear nothing more."""
        for stream in self._streams.values():
            if stream.who.token_id in token_ids:
                stream.live = False
        for session in self._sessions.values():
            for uri, subscriber in list(session.uris.items()):
                if subscriber.who.token_id in token_ids:
                    del session.uris[uri]

    def _deliver(self, event: ServerEvent, may_read: MayRead) -> None:
        for stream in list(self._streams.values()):
            if not stream.live or not may_read(stream.who):
                continue
            try:
                stream.listener(event)
            except Exception:  # one stream's trouble must not starve the others
                log.exception("a subscription listener failed; continuing")

    def caller(self) -> Identity:
        """Who is calling now: a bridge session's identity, an HTTP request's token, else the operator."""
        if (bridged := acting_as.get()) is not None:
            return bridged
        token = get_access_token()
        if isinstance(token, CallerToken):
            return token.identity
        if token is not None:  # authenticated by something that is not a dockyard token
            return Identity(workspace_id="", user_id="", scopes=[])
        return self._operator
