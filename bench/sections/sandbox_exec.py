"""exec: `true` in one sandbox through sandbox_exec, the Docker CLI and the Engine API."""

from __future__ import annotations

import time

import anyio

from bench.figures import Figure, Target
from bench.run import Options, Run
from bench.served import Served, ToolCallError, serve, timed
from dockyard.runtime.runtimes.provision import USER

__all__ = ["measure"]

SECTION = "exec"
WARMUP = 3
# The paths take turns in blocks of back-to-back calls, as an agent issues commands, and each
# block starts with one untimed call: the Docker daemon keeps working for a few milliseconds
# after an exec has returned, which would otherwise be charged to whichever path runs next.
BLOCKS = 5


def _engine_api_exec(run: Run, container_id: str) -> float:
    """`true` as the sandbox user through exec_create + exec_start (blocking); returns milliseconds."""
    api, started = run.docker.api, time.perf_counter()
    exec_id = api.exec_create(container_id, ["true"], user=USER)["Id"]
    api.exec_start(exec_id)
    return (time.perf_counter() - started) * 1000


async def _sandbox_exec(served: Served, sandbox_id: str) -> None:
    result = await served.call("sandbox_exec", sandbox_id=sandbox_id, command="true")
    if result["exit_code"] != 0:
        raise ToolCallError(f"sandbox_exec of true exited {result['exit_code']}: {result['stderr']}")


async def measure(run: Run, options: Options) -> list[Figure]:
    """The three paths take turns on the same container, as the same user."""
    ours: list[float] = []
    cli: list[float] = []
    engine_api: list[float] = []
    async with serve(run, "exec", pool_min=2, pool_max=4) as served:
        await served.settle(lambda warm: warm >= 2)
        sandbox_id = (await served.call("sandbox_create"))["sandbox_id"]
        await served.settle(lambda warm: warm >= 2)  # the claimed runtime's replacement has started
        container_id = await anyio.to_thread.run_sync(served.container_of, run, sandbox_id)
        docker_exec = ["docker", "exec", "-u", USER, container_id, "true"]
        for _ in range(WARMUP):
            await _sandbox_exec(served, sandbox_id)
            await anyio.run_process(docker_exec)
            await anyio.to_thread.run_sync(_engine_api_exec, run, container_id)
        paths = [
            (ours, lambda: _sandbox_exec(served, sandbox_id)),
            (cli, lambda: anyio.run_process(docker_exec)),
            (engine_api, lambda: anyio.to_thread.run_sync(_engine_api_exec, run, container_id)),
        ]
        per_block = max(options.runs // BLOCKS, 1)
        for block in range(BLOCKS):
            for samples, call in paths[block % 3 :] + paths[: block % 3]:  # each path goes first in turn
                await call()
                for _ in range(per_block):
                    await timed(samples, call)
        await served.call("sandbox_destroy", sandbox_id=sandbox_id)
    name = "sandbox_exec `true` (MCP over stdio)"
    return [
        Figure(
            SECTION,
            name,
            samples=ours,
            baseline="exec_create + exec_start (Engine API)",
            baseline_samples=engine_api,
            target=Target.speedup(5),
        ),
        Figure(SECTION, name, samples=ours, baseline="docker exec (CLI)", baseline_samples=cli),
    ]
