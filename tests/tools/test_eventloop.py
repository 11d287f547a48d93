"""A read cancelled as its bytes arrive is not reported as a loop error while the server runs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import pytest
from mcp import Client

from dockyard.runtime.substrate.settings import Settings
from dockyard.server.app import build_server

pytestmark = pytest.mark.anyio


async def cancel_reads_as_bytes_arrive(socket_path: Path, rounds: int) -> int:
    """Cancel a pending UNIX-socket receive in the loop turn its peer's byte arrives; bytes read back."""
    listener = await anyio.create_unix_listener(socket_path)
    async with listener:
        client = await anyio.connect_unix(socket_path)
        peer = await listener.accept()
        async with client, peer:
            raw = peer.extra(anyio.abc.SocketAttribute.raw_socket)
            received = b""

            async def receive() -> None:
                nonlocal received
                received += await client.receive()

            for _ in range(rounds):
                async with anyio.create_task_group() as group:
                    group.start_soon(receive)
                    await anyio.wait_all_tasks_blocked()
                    raw.send(b"x")
                    await anyio.lowlevel.checkpoint()
                    group.cancel_scope.cancel()
            with anyio.move_on_after(5):
                while len(received) < rounds:
                    received += await client.receive()
            return len(received)


async def test_cancelled_socket_reads_raise_no_loop_error_and_lose_no_bytes(
    settings: Settings, cleanup: None, tmp_path: Path
) -> None:
    """Supervisor links, bridge sessions and DevTools relays cancel reads all the time; anyio's
    asyncio backend then reports a harmless InvalidStateError to the loop, which a strict host
    (this test runner among them) turns into a failure. With the server running it is dropped,
    no byte is lost, and every other loop error still reaches the handler that was there before."""
    reports: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reports.append(context))
    try:
        async with Client(build_server(settings)):
            assert await cancel_reads_as_bytes_arrive(tmp_path / "race.sock", 50) == 50
            loop.call_soon(lambda: 1 / 0)
            await anyio.sleep(0.05)
        assert [type(report.get("exception")) for report in reports] == [ZeroDivisionError]
        reports.clear()
        assert await cancel_reads_as_bytes_arrive(tmp_path / "bare.sock", 50) == 50
        assert any(isinstance(report.get("exception"), asyncio.InvalidStateError) for report in reports), (
            "the race no longer happens without the server; the filter may be obsolete"
        )
    finally:
        loop.set_exception_handler(before)
