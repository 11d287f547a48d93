"""Host-side relays: loopback listeners that let a connection through only once its first
request head proves it holds the endpoint's secret.

Exposed sandbox ports (`ports.py`) and a computer's DevTools endpoint (`browsers.py`) are
served on 127.0.0.1 of this machine, where any local user or process can connect. So each
connection starts at a gate: its first HTTP request head is read (bounded in size and time)
and judged; a refused one gets a short HTTP answer and is closed before a byte reaches the
sandbox or the browser; an accepted one is relayed raw from then on (keep-alive, WebSockets).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import anyio
import anyio.abc

from dockyard.runtime.runtimes.supervisor import connect_unix
from dockyard.runtime.substrate.errors import BackendError

__all__ = ["Gate", "Relay", "RequestHead", "answer", "bearer_gate", "bearer_of", "serve", "to_unix"]

log = logging.getLogger(__name__)

HEAD_MAX_BYTES = 16 * 1024
HEAD_TIMEOUT_S = 10.0
_ENDED = (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, BackendError)


@dataclass(frozen=True)
class RequestHead:
    """The request line and header fields of an HTTP/1.x request, as sent."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]

    def values(self, name: str) -> list[str]:
        """Every value of the header `name` (case-insensitive)."""
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def without(self, keep: Callable[[str, str], bool]) -> RequestHead:
        """The same head with only the fields `keep(name, value)` accepts."""
        return replace(self, headers=tuple((k, v) for k, v in self.headers if keep(k, v)))

    def encode(self) -> bytes:
        lines = [f"{self.method} {self.target} {self.version}", *(f"{k}: {v}" for k, v in self.headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


Gate = Callable[[RequestHead], "RequestHead | bytes"]
"""Judges a connection's first request: the head to pass on, or the answer to close with."""

Relay = Callable[[anyio.abc.SocketStream, bytes], Awaitable[None]]
"""Relays one admitted connection; the bytes are to be sent upstream first."""


def answer(status: int, reason: str, body: str, *headers: str) -> bytes:
    """A complete, closing HTTP/1.1 response."""
    data = body.encode()
    fields = [
        *headers,
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(data)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    return (f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{f}\r\n" for f in fields) + "\r\n").encode() + data


def bearer_of(head: RequestHead) -> str | None:
    """The token of an `Authorization: Bearer` header, if there is one."""
    for value in head.values("authorization"):
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def bearer_gate(secret: str) -> Gate:
    """Admit only requests with `Authorization: Bearer <secret>`; the header goes no further."""

    def judge(head: RequestHead) -> RequestHead | bytes:
        token = bearer_of(head)
        if token is None:
            return answer(
                401,
                "Unauthorized",
                "this endpoint needs its bearer token\n",
                'WWW-Authenticate: Bearer realm="dockyard"',
            )
        if not hmac.compare_digest(token.encode(), secret.encode()):
            return answer(403, "Forbidden", "wrong token\n")
        return head.without(lambda name, _: name.lower() != "authorization")

    return judge


async def serve(
    listener: anyio.abc.Listener[anyio.abc.SocketStream],
    gate: Gate,
    relay: Relay,
    *,
    task_status: anyio.abc.TaskStatus[anyio.CancelScope],
) -> None:
    """Serve `listener` until the returned scope is cancelled: each connection through `gate`,
    then, if admitted, to `relay`."""
    with anyio.CancelScope() as scope:
        task_status.started(scope)
        async with listener:
            await listener.serve(partial(_admit, gate, relay))


def to_unix(socket: Path) -> Relay:
    """A relay to a unix socket of this machine."""

    async def relay(client: anyio.abc.SocketStream, first: bytes) -> None:
        async with await connect_unix(socket) as upstream:
            await upstream.send(first)
            async with anyio.create_task_group() as tg:

                async def pump(source: anyio.abc.ByteStream, sink: anyio.abc.ByteStream) -> None:
                    try:
                        async for chunk in source:
                            await sink.send(chunk)
                    finally:
                        tg.cancel_scope.cancel()

                tg.start_soon(pump, client, upstream)
                tg.start_soon(pump, upstream, client)

    return relay


async def _admit(gate: Gate, relay: Relay, client: anyio.abc.SocketStream) -> None:
    """One connection: nothing is relayed before its first request head passes the gate. No
    error of one connection may end the listener, so every way a connection ends is caught."""
    async with client:
        try:
            try:
                first = None
                with anyio.move_on_after(HEAD_TIMEOUT_S):  # a client that sends too little is dropped
                    first = await _judge(gate, client)
                if first is not None:
                    await relay(client, first)
            except* _ENDED as ended:  # the relays' task groups raise their pumps' endings in groups
                log.debug("relayed connection ended: %s", ended.exceptions[0])
        except Exception:  # one connection's failure must not end the listener (or the server's task group)
            log.exception("relayed connection failed")


async def _judge(gate: Gate, client: anyio.abc.SocketStream) -> bytes | None:
    """The bytes to relay for an admitted connection; None once a refused one is answered."""
    head, rest = await _read_head(client)
    if head is None:
        await client.send(answer(400, "Bad Request", "not an HTTP/1 request\n"))
        return None
    verdict = gate(head)
    if isinstance(verdict, bytes):
        await client.send(verdict)
        return None
    return verdict.encode() + rest


async def _read_head(client: anyio.abc.SocketStream) -> tuple[RequestHead | None, bytes]:
    """The first request head and the bytes already read past it; None for anything that is
    not a well-formed HTTP/1 request head within HEAD_MAX_BYTES."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > HEAD_MAX_BYTES:
            return None, b""
        buffer += await client.receive()  # EndOfStream: the client left before its request
    raw, _, rest = buffer.partition(b"\r\n\r\n")
    if len(raw) > HEAD_MAX_BYTES:
        return None, b""
    return _parse(raw.decode("latin-1")), rest


def _parse(raw: str) -> RequestHead | None:
    if any(c in raw.replace("\r\n", "") for c in "\r\n\x00"):
        return None  # a lone CR or LF: a head the upstream might split where the gate did not
    line, *fields = raw.split("\r\n")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[0].isupper() or parts[2] not in ("HTTP/1.0", "HTTP/1.1"):
        return None
    headers = []
    for field in fields:
        name, colon, value = field.partition(":")
        if not colon or not name or name != name.strip() or any(c in name for c in " \t\n\x00"):
            return None  # no folded lines, no spaces before the colon
        headers.append((name, value.strip(" \t")))
    return RequestHead(parts[0], parts[1], parts[2], tuple(headers))
