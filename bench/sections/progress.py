"""progress: how long a line printed in a sandbox takes to reach the client as a progress
notification of sandbox_exec, beside the same line read from `docker exec`'s stdout.

The command prints the time (`date +%s.%N`) every 200 ms; the client notes the time each line
arrives. Both clocks are this host's (a container reads the host's clock), so the difference
is the line's trip: pipe, supervisor, control link, server, MCP stdio, client.
"""

from __future__ import annotations

import time

import anyio

from bench.figures import Figure, Target
from bench.run import Options, Run
from bench.served import ToolCallError, serve
from dockyard.runtime.runtimes.provision import USER

__all__ = ["measure"]

SECTION = "progress"
TARGET_MS = 20.0
WARMUP = 2  # the first lines of each path are not counted (bash and date starting cold)


def _ticks(count: int) -> str:
    return f"for i in $(seq {count}); do date +%s.%N; sleep 0.2; done"


def _latencies(message: str, arrived: float, into: list[float]) -> None:
    """Each timestamp line of `message`, as milliseconds from when it was printed to `arrived`."""
    for line in message.splitlines():
        try:
            printed = float(line.strip())
        except ValueError:  # a heartbeat or a note
            continue
        into.append((arrived - printed) * 1000)


async def _docker_exec(container_id: str, count: int) -> list[float]:
    """The same command under `docker exec`, its stdout read line by line as it comes."""
    samples: list[float] = []
    argv = ["docker", "exec", "-u", USER, container_id, "bash", "-c", _ticks(count)]
    async with await anyio.open_process(argv) as process:
        assert process.stdout is not None
        pending = b""
        async for chunk in process.stdout:
            arrived = time.time()
            pending += chunk
            *lines, pending = pending.split(b"\n")
            _latencies(b"\n".join(lines).decode(), arrived, samples)
    return samples


async def measure(run: Run, options: Options) -> list[Figure]:
    """Lines through sandbox_exec's progress notifications, then through `docker exec`."""
    count = options.runs + WARMUP
    ours: list[float] = []
    async with serve(run, "progress", pool_min=1, pool_max=2) as served:
        await served.settle(lambda warm: warm >= 1)
        sandbox_id = (await served.call("sandbox_create"))["sandbox_id"]

        async def heard(progress: float, total: float | None, message: str | None) -> None:
            _latencies(message or "", time.time(), ours)

        result = await served.client.call_tool(
            "sandbox_exec", {"sandbox_id": sandbox_id, "command": _ticks(count)}, progress_callback=heard
        )
        if result.is_error:
            raise ToolCallError(f"sandbox_exec of the ticking loop failed: {result.content}")
        container_id = await anyio.to_thread.run_sync(served.container_of, run, sandbox_id)
        baseline = await _docker_exec(container_id, count)
        await served.call("sandbox_destroy", sandbox_id=sandbox_id)
    return [
        Figure(
            SECTION,
            "a printed line to its progress notification (sandbox_exec, MCP over stdio)",
            samples=ours[WARMUP:],
            baseline="the same line from `docker exec`'s stdout",
            baseline_samples=baseline[WARMUP:],
            target=Target.below(TARGET_MS),
        )
    ]
