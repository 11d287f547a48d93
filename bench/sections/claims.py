"""claims: a warm-pool sandbox_create beside a cold start of the same hardened container.

* warm, one at a time: `sandbox_create` on a served pool (min 2, max 4), each timed alone
  after the pool has settled (a runtime warm, nothing starting or draining);
* warm, 20 in parallel: 20 concurrent `sandbox_create` calls on a pool holding 20 warm
  runtimes (min 20, max 24), each call timed on its own, for `--rounds` rounds;
* cold baselines with the hardening, image and limits read off one of the server's own
  containers: `docker run -d` through the CLI and create + start through the Engine API, one
  at a time, and 20 `docker run -d` at once.
A warm claim also pays the MCP round trip and the store's writes, so cold p50 / warm p50 errs low.
"""

from __future__ import annotations

import anyio

from bench.containers import Hardening, cli_run_argv, engine_api_start
from bench.figures import Figure, Target
from bench.run import Options, Run, say
from bench.served import Served, serve, timed

__all__ = ["measure"]

SECTION = "claims"
PARALLEL = 20


async def _claim(served: Served, samples: list[float], ids: list[str]) -> None:
    ids.append((await timed(samples, served.call, "sandbox_create"))["sandbox_id"])


async def _destroy(served: Served, sandbox_id: str) -> None:
    await served.call("sandbox_destroy", sandbox_id=sandbox_id)


async def _warm(
    run: Run, name: str, shape: tuple[int, int], batch: int, repeats: int
) -> tuple[list[float], int, Hardening]:
    """Time `batch` concurrent claims on a settled pool `repeats` times.

    Also returns how many claims the pool served cold (should be none) and the hardening of
    one of its containers, for the baselines.
    """
    samples: list[float] = []
    enough = (lambda warm: warm >= 1) if batch == 1 else (lambda warm: warm == batch)
    async with serve(run, name, pool_min=shape[0], pool_max=shape[1]) as served:
        await served.settle(enough)
        spec = await anyio.to_thread.run_sync(Hardening.of, run, served.containers(run)[0])
        await _destroy(served, (await served.call("sandbox_create"))["sandbox_id"])  # untimed: first-call costs
        for _ in range(repeats):
            await served.settle(enough)
            ids: list[str] = []
            async with anyio.create_task_group() as tg:
                for _ in range(batch):
                    tg.start_soon(_claim, served, samples, ids)
            async with anyio.create_task_group() as tg:  # untimed
                for sandbox_id in ids:
                    tg.start_soon(_destroy, served, sandbox_id)
        pool = await served.settle(enough)
    if pool["claims_cold"]:
        say(f"[yellow]claims: the {name} pool served {pool['claims_cold']} claims cold; its figure is not all warm")
    return samples, pool["claims_cold"], spec


async def _cold(run: Run, spec: Hardening, options: Options) -> tuple[list[float], list[float], list[float]]:
    """One at a time through the CLI and the Engine API, then 20 at once through the CLI."""
    argv = cli_run_argv(run, spec)
    cli: list[float] = []
    engine_api: list[float] = []
    parallel: list[float] = []
    await anyio.run_process(argv)  # untimed: warm the daemon's and the page caches
    await anyio.to_thread.run_sync(run.remove, run.label)
    for _ in range(options.runs):
        await timed(cli, anyio.run_process, argv)
        await anyio.to_thread.run_sync(run.remove, run.label)
        engine_api.append(await anyio.to_thread.run_sync(engine_api_start, run, spec))
        await anyio.to_thread.run_sync(run.remove, run.label)
    for _ in range(options.rounds):
        async with anyio.create_task_group() as tg:
            for _ in range(PARALLEL):
                tg.start_soon(timed, parallel, anyio.run_process, argv)
        await anyio.to_thread.run_sync(run.remove, run.label)
    return cli, engine_api, parallel


async def measure(run: Run, options: Options) -> list[Figure]:
    """Warm one at a time, then the cold baselines, then warm 20 in parallel."""
    one, one_cold, spec = await _warm(run, "claims-one", (2, 4), 1, options.runs)
    cli, engine_api, cold_many = await _cold(run, spec, options)
    many, many_cold, _ = await _warm(run, "claims-parallel", (PARALLEL, PARALLEL + 4), PARALLEL, options.rounds)
    one_name = "warm sandbox_create, one at a time"
    return [
        Figure(
            SECTION,
            one_name,
            samples=one,
            baseline="cold docker run -d (CLI)",
            baseline_samples=cli,
            target=Target.speedup(10),
            details={"claims_served_cold": one_cold},
        ),
        Figure(
            SECTION, one_name, samples=one, baseline="cold create + start (Engine API)", baseline_samples=engine_api
        ),
        Figure(
            SECTION,
            f"warm sandbox_create, {PARALLEL} in parallel",
            samples=many,
            baseline=f"cold docker run -d, {PARALLEL} in parallel (CLI)",
            baseline_samples=cold_many,
            target=Target.speedup(3),
            details={"claims_served_cold": many_cold},
        ),
    ]
