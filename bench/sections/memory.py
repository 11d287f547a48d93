"""memory: an idle warm sandbox beside a plain container, and the server's RSS beside a minimal server's."""

from __future__ import annotations

import sys
from pathlib import Path

import anyio
from mcp import StdioServerParameters

from bench.containers import Hardening, cli_run_argv, memory_mib
from bench.figures import Figure
from bench.run import Options, Run
from bench.served import serve, stdio

__all__ = ["measure"]

SECTION = "memory"
WARM = 2
QUIET_S = 5.0  # after the pool settles: let the just-started containers and processes go idle
EVERY_S = 0.1
MINIMAL_SERVER = Path(__file__).resolve().parent.parent / "minimal_server.py"


def rss_mib(pid: int) -> float:
    """The process's resident set size (VmRSS) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise LookupError(f"/proc/{pid}/status has no VmRSS")


async def _rss_samples(pid: int, runs: int) -> list[float]:
    samples: list[float] = []
    for _ in range(runs):
        samples.append(rss_mib(pid))
        await anyio.sleep(EVERY_S)
    return samples


async def _minimal_server_rss(run: Run, runs: int) -> list[float]:
    params = StdioServerParameters(command=sys.executable, args=[str(MINIMAL_SERVER)])
    async with stdio(params, run.root / "minimal-server.log", "legacy") as (client, pid):
        await client.call_tool("whoami", {})
        await anyio.sleep(QUIET_S)
        return await _rss_samples(pid, runs)


async def measure(run: Run, options: Options) -> list[Figure]:
    """The warm runtimes and as many plain containers are read in turns, once all are idle."""
    async with serve(run, "memory", pool_min=WARM, pool_max=WARM + 2) as served:
        await served.settle(lambda warm: warm == WARM)
        warm = served.containers(run)
        spec = await anyio.to_thread.run_sync(Hardening.of, run, warm[0])
        plain = []
        for _ in warm:
            started = await anyio.run_process(cli_run_argv(run, spec))
            plain.append(started.stdout.decode().strip())
        await anyio.sleep(QUIET_S)
        await served.settle(lambda count: count == WARM)
        sandboxes: list[float] = []
        baseline: list[float] = []
        for index in range(options.runs):
            sandboxes.append(await anyio.to_thread.run_sync(memory_mib, run, warm[index % len(warm)]))
            baseline.append(await anyio.to_thread.run_sync(memory_mib, run, plain[index % len(plain)]))
            await anyio.sleep(EVERY_S)
        server = await _rss_samples(served.pid, options.runs)
    await anyio.to_thread.run_sync(run.remove, run.label)
    minimal = await _minimal_server_rss(run, options.runs)
    return [
        Figure(
            SECTION,
            "idle warm sandbox (cgroup memory, as docker stats)",
            unit="MiB",
            samples=sandboxes,
            baseline="sleep infinity container, same image and limits",
            baseline_samples=baseline,
            details={"containers": len(warm)},
        ),
        Figure(
            SECTION,
            f"dockyard serve RSS, pool of {WARM} warm",
            unit="MiB",
            samples=server,
            baseline="minimal MCP server on the same SDK (stdio)",
            baseline_samples=minimal,
        ),
    ]
