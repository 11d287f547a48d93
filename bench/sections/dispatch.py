"""dispatch: a trivial task from dispatch to its result, and the throughput of 100 dispatches.

Both figures run on one served pool (min 4, max 8) and set dispatch beside the work a client
would otherwise do by hand through the tools: `sandbox_create`, `sandbox_exec` of the script,
`sandbox_destroy`.

* dispatch to result: `dispatch(mode="remote", prompt="echo ok")`, then `await_dispatch` until
  it is completed, timed together, one at a time, min(--runs, 30) samples. Before each sample
  the pool is idle again (its minimum warm, nothing claimed, starting or draining), so every
  claim is warm; the by-hand path takes turns with it on the same pool. A dispatch's result is
  committed before its sandbox is given back, so dispatch does not wait for that step, while
  the by-hand path waits for `sandbox_destroy`'s reply.
* throughput: 100 dispatches sent at once, then all awaited; dispatches per second over the
  wall time from the first send to the last result (a rate: higher is better, and the ratio is
  ours / baseline). Baseline: 100 by-hand sequences at most `max` at a time, as many as the
  pool holds, per second. One sample each per --rounds, the two taking turns to go first.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from bench.figures import Figure
from bench.run import Options, Run, say
from bench.served import Served, ToolCallError, serve, timed

__all__ = ["measure"]

SECTION = "dispatch"
POOL_MIN, POOL_MAX = 4, 8
MAX_SAMPLES = 30
BATCH = 100
SCRIPT = "echo ok"
WAIT_S = 300  # await_dispatch's timeout per call; a dispatch still running then is waited on again


async def _idle(served: Served, timeout_s: float = 180) -> dict[str, Any]:
    """Poll until the pool holds its minimum warm and nothing is claimed, starting or draining."""
    with anyio.fail_after(timeout_s):
        while True:
            pool = await served.pool()
            if pool["warm"] >= POOL_MIN and pool["claimed"] == pool["provisioning"] == pool["draining"] == 0:
                return pool
            await anyio.sleep(0.05)


async def _send(served: Served) -> str:
    sent = await served.call(
        "dispatch", mode="remote", rationale="a benchmark of a trivial script", task_summary="print ok", prompt=SCRIPT
    )
    return str(sent["dispatch_id"])


async def _result(served: Served, dispatch_id: str) -> None:
    """Await a dispatch until it is final; anything but a completed `ok` raises."""
    done = await served.call("await_dispatch", dispatch_id=dispatch_id, timeout_s=WAIT_S)
    while done["status"] in ("queued", "running"):
        done = await served.call("await_dispatch", dispatch_id=dispatch_id, timeout_s=WAIT_S)
    if (done["status"], done["result"]) != ("completed", "ok\n"):
        raise ToolCallError(f"dispatch {dispatch_id} ended {done['status']}: {done['error'] or done['result']!r}")


async def _dispatched(served: Served) -> None:
    """One trivial task through dispatch, up to its result."""
    await _result(served, await _send(served))


async def _by_hand(served: Served) -> None:
    """The same task through the tools a client would otherwise call."""
    sandbox_id = (await served.call("sandbox_create"))["sandbox_id"]
    ran = await served.call("sandbox_exec", sandbox_id=sandbox_id, command=SCRIPT)
    if (ran["exit_code"], ran["stdout"]) != (0, "ok\n"):
        raise ToolCallError(f"sandbox_exec of {SCRIPT} exited {ran['exit_code']}: {ran['stderr']}")
    await served.call("sandbox_destroy", sandbox_id=sandbox_id)


async def _batch_dispatched(served: Served) -> float:
    """BATCH dispatches sent at once, then all awaited; returns the wall time in seconds."""
    ids: list[str] = []

    async def send() -> None:
        ids.append(await _send(served))

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(BATCH):
            tg.start_soon(send)
    async with anyio.create_task_group() as tg:
        for dispatch_id in ids:
            tg.start_soon(_result, served, dispatch_id)
    return time.perf_counter() - started


async def _batch_by_hand(served: Served) -> float:
    """BATCH by-hand sequences, at most POOL_MAX at a time; returns the wall time in seconds."""
    limiter = anyio.CapacityLimiter(POOL_MAX)

    async def one() -> None:
        async with limiter:
            await _by_hand(served)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(BATCH):
            tg.start_soon(one)
    return time.perf_counter() - started


async def _cold_claims(served: Served, since: dict[str, Any]) -> int:
    return int((await served.pool())["claims_cold"] - since["claims_cold"])


async def measure(run: Run, options: Options) -> list[Figure]:
    """Dispatch to result and the by-hand path in turns, then the two batches in turns."""
    samples = min(options.runs, MAX_SAMPLES)
    ours: list[float] = []
    by_hand: list[float] = []
    rates: list[float] = []
    by_hand_rates: list[float] = []
    walls: dict[str, list[float]] = {"dispatch_s": [], "by_hand_s": []}
    async with serve(run, "dispatch", pool_min=POOL_MIN, pool_max=POOL_MAX) as served:
        await _idle(served)
        for call in (_dispatched, _by_hand):  # untimed: first-call costs
            await call(served)
            await _idle(served)
        start = await served.pool()
        for _ in range(samples):
            for timings, call in ((ours, _dispatched), (by_hand, _by_hand)):
                await timed(timings, call, served)
                await _idle(served)
        one_cold = await _cold_claims(served, start)
        if one_cold:
            say(
                f"[yellow]dispatch: {one_cold} of the one-at-a-time claims were served cold; that figure is not all warm"
            )
        batches: list[tuple[list[float], list[float], Callable[[Served], Awaitable[float]]]] = [
            (rates, walls["dispatch_s"], _batch_dispatched),
            (by_hand_rates, walls["by_hand_s"], _batch_by_hand),
        ]
        start = await served.pool()
        for round_ in range(options.rounds):
            for per_second, wall, batch in batches[round_ % 2 :] + batches[: round_ % 2]:  # each goes first in turn
                seconds = await batch(served)
                wall.append(round(seconds, 3))
                per_second.append(BATCH / seconds)
                await _idle(served)
        batch_cold = await _cold_claims(served, start)
    pool = f"pool min {POOL_MIN}, max {POOL_MAX}"
    return [
        Figure(
            SECTION,
            "dispatch-to-result of a trivial task (`echo ok`)",
            samples=ours,
            baseline="sandbox_create + sandbox_exec + sandbox_destroy",
            baseline_samples=by_hand,
            details={"pool": {"min": POOL_MIN, "max": POOL_MAX}, "claims_served_cold": one_cold},
        ),
        Figure(
            SECTION,
            f"throughput of {BATCH} dispatches sent at once ({pool})",
            unit="/s",
            higher_is_better=True,
            samples=rates,
            baseline=f"{BATCH} create + exec + destroy, {POOL_MAX} at a time",
            baseline_samples=by_hand_rates,
            details={
                "pool": {"min": POOL_MIN, "max": POOL_MAX},
                "batch": BATCH,
                "wall_time_s": walls,
                "claims_served_cold": batch_cold,
            },
        ),
    ]
