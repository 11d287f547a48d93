"""The relay gate on its own (no Docker): what a connection must show before anything is
relayed, and that no client can end the listener."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import anyio.abc
import pytest

from dockyard.runtime.runtimes import relays

pytestmark = pytest.mark.anyio

SECRET = "s3cret-token"


@asynccontextmanager
async def gated() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A bearer-gated listener whose relay records what it was handed and answers 'relayed'
    (or fails, for a request to /boom)."""
    handed: list[bytes] = []

    async def relay(client: anyio.abc.SocketStream, first: bytes) -> None:
        handed.append(first)
        if b" /boom " in first:
            raise ValueError("a relay that fails")
        await client.send(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nrelayed")

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg:
        await tg.start(relays.serve, listener, relays.bearer_gate(SECRET), relay)
        yield port, handed
        tg.cancel_scope.cancel()


async def send(port: int, data: bytes) -> bytes:
    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
            received = b""
            try:
                conn.sendall(data)
                while chunk := conn.recv(65536):
                    received += chunk
            except (ConnectionResetError, BrokenPipeError):
                pass
            return received

    return await anyio.to_thread.run_sync(exchange)


async def test_only_the_bearer_token_opens_the_relay_and_the_token_goes_no_further() -> None:
    async with gated() as (port, handed):
        assert (await send(port, b"GET /json/list HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(b"HTTP/1.1 401")
        assert (await send(port, b"GET / HTTP/1.1\r\nAuthorization: Bearer guess\r\n\r\n")).startswith(b"HTTP/1.1 403")
        assert (await send(port, b"GET / HTTP/1.1\r\nAuthorization: Basic czNjcmV0LXRva2Vu\r\n\r\n")).startswith(
            b"HTTP/1.1 401"
        )
        assert handed == []
        admitted = await send(port, f"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {SECRET}\r\n\r\nbody".encode())
        assert admitted.endswith(b"relayed")
        assert handed == [b"GET / HTTP/1.1\r\nHost: x\r\n\r\nbody"]


async def test_heads_the_gate_cannot_read_as_the_upstream_would_are_refused() -> None:
    async with gated() as (port, handed):
        token = f"Authorization: Bearer {SECRET}".encode()
        for head in (
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",  # a TLS hello, or any garbage
            b"GET / HTTP/1.1\nX: y\r\n" + token + b"\r\n\r\n",  # a lone LF
            b"GET / HTTP/1.1\r\n folded\r\n" + token + b"\r\n\r\n",  # a folded line
            b"GET / HTTP/1.1\r\nX : y\r\n" + token + b"\r\n\r\n",  # a space before the colon
            b"GET / HTTP/2.0\r\n" + token + b"\r\n\r\n",
            b"GET / HTTP/1.1\r\n" + token + b"\r\nX: " + b"a" * 20_000 + b"\r\n\r\n",  # over the size bound
        ):
            assert (await send(port, head)).startswith(b"HTTP/1.1 400"), head[:40]
        assert handed == []


async def test_a_failing_or_silent_connection_does_not_end_the_listener() -> None:
    async with gated() as (port, handed):
        with anyio.fail_after(relays.HEAD_TIMEOUT_S + 10):
            assert await send(port, b"") == b""  # silence: dropped after the head timeout
        await send(port, f"GET /boom HTTP/1.1\r\nAuthorization: Bearer {SECRET}\r\n\r\n".encode())
        admitted = await send(port, f"GET / HTTP/1.1\r\nAuthorization: Bearer {SECRET}\r\n\r\n".encode())
        assert admitted.endswith(b"relayed") and len(handed) == 2
