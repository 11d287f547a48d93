"""noop: what one MCP tool call costs over stdio and over streamable HTTP, next to a protocol
round trip on the same session."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from bench.figures import Figure, Target
from bench.run import Options, Run
from bench.served import Served, checked, serve, serve_http, timed

__all__ = ["measure"]

SECTION = "noop"
WARMUP = 5
TARGET_MS = 2.0


async def _alternate(
    runs: int, ours: Callable[[], Awaitable[Any]], baseline: Callable[[], Awaitable[Any]]
) -> tuple[list[float], list[float]]:
    """Time `ours` and `baseline` alternately, after a few untimed calls of each."""
    for _ in range(WARMUP):
        await ours()
        await baseline()
    ours_ms: list[float] = []
    baseline_ms: list[float] = []
    for _ in range(runs):
        await timed(ours_ms, ours)
        await timed(baseline_ms, baseline)
    return ours_ms, baseline_ms


def _whoami(served: Served) -> Callable[[], Awaitable[Any]]:
    return lambda: served.call("whoami")


async def measure(run: Run, options: Options) -> list[Figure]:
    """whoami over stdio beside ping (2025-11-25 session) and server/discover (2026-07-28 session)."""
    async with serve(run, "noop-handshake", pool_min=2, pool_max=4, mode="legacy") as served:
        await served.settle(lambda warm: warm >= 2)  # time the steady state, not the pool filling up
        version = served.client.protocol_version
        ours, ping = await _alternate(options.runs, _whoami(served), served.client.session.send_ping)
    handshake = Figure(
        SECTION,
        f"whoami over stdio (protocol {version})",
        samples=ours,
        baseline="MCP ping round trip, same session",
        baseline_samples=ping,
        target=Target.below(TARGET_MS),
    )
    async with serve(run, "noop-modern", pool_min=2, pool_max=4, mode="auto") as served:
        await served.settle(lambda warm: warm >= 2)
        version = served.client.protocol_version
        session = served.client.session
        ours, discover = await _alternate(options.runs, _whoami(served), lambda: session.send_discover(version))
    modern = Figure(
        SECTION,
        f"whoami over stdio (protocol {version})",
        samples=ours,
        baseline="server/discover round trip, same session",
        baseline_samples=discover,
        target=Target.below(TARGET_MS),
    )
    async with serve_http(run, "noop-http", scopes=["sandbox:exec"]) as client:
        version = client.protocol_version
        session = client.session

        async def whoami() -> Any:
            return checked("whoami", await client.call_tool("whoami", {}))

        ours, discover = await _alternate(options.runs, whoami, lambda: session.send_discover(version))
    http = Figure(
        SECTION,
        f"whoami over streamable HTTP with a bearer token (protocol {version})",
        samples=ours,
        baseline="server/discover round trip, same session",
        baseline_samples=discover,
    )
    return [handshake, modern, http]
