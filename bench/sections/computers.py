"""computers: a warm computer_create beside a cold start of the same browser container.

* warm: `computer_create` on a served computer pool (min 2, max 4), timed after the pool has
  settled; it includes connecting Playwright over CDP and opening a fresh page, so it does
  more than the baseline;
* cold baseline: `docker run -d` of the computer image, with the hardening read off one of
  the server's own computers and a socket directory bind-mounted like the server's, until
  the browser answers `GET /json/version` on its DevTools socket;
* first screenshot: `computer_screenshot` of a blank page right after a warm create.
Destroyed computers are never reused, so each warm sample waits for the pool to refill first.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import httpx

from bench.containers import Hardening, cli_run_argv
from bench.figures import Figure, Target
from bench.run import Options, Run
from bench.served import Served, serve, timed

__all__ = ["measure"]

SECTION = "computers"
SOCKET_DIR = "/run/dockyard-cdp"
READY_TIMEOUT_S = 60.0


async def _warm(run: Run, options: Options) -> tuple[list[float], list[float], Hardening]:
    creates: list[float] = []
    shots: list[float] = []

    def enough(warm: int) -> bool:
        return warm >= 1

    async with serve(run, "computers", pool_min=0, pool_max=1, computers=(2, 4)) as served:
        await served.settle(enough, template="computer")
        computer = await _computer_container(run, served)
        spec = await anyio.to_thread.run_sync(Hardening.of, run, computer)
        first = (await served.call("computer_create"))["computer_id"]  # untimed: first-call costs
        await served.call("computer_destroy", computer_id=first)
        for _ in range(options.runs):
            await served.settle(enough, template="computer")
            computer_id = (await timed(creates, served.call, "computer_create"))["computer_id"]
            started = time.perf_counter()
            shot = await served.client.call_tool("computer_screenshot", {"computer_id": computer_id})
            shots.append((time.perf_counter() - started) * 1000)
            if shot.is_error:
                raise RuntimeError(f"computer_screenshot failed: {shot.content}")
            await served.call("computer_destroy", computer_id=computer_id)
    return creates, shots, spec


async def _computer_container(run: Run, served: Served) -> str:
    found = run.docker.api.containers(
        filters={"label": [f"dockyard.instance={served.instance}", "dockyard.kind=computer"]}
    )
    if not found:
        raise LookupError("the server has no running computer")
    return str(found[0]["Id"])


async def _cold(run: Run, spec: Hardening, options: Options) -> list[float]:
    """Start the computer image as the server would, until its browser answers (DevTools only
    answers requests that name localhost or an IP)."""
    samples: list[float] = []
    for index in range(options.runs + 1):
        sockets = run.root / "cdp" / str(index)
        sockets.mkdir(parents=True)
        sockets.chmod(0o777)
        argv = [*cli_run_argv(run, spec)[:-3], "-v", f"{sockets}:{SOCKET_DIR}", spec.image]  # the image's own command
        started = time.perf_counter()
        await anyio.run_process(argv)
        await _answers(sockets / "cdp.sock")
        if index:  # the first start only warms the daemon's and the page caches
            samples.append((time.perf_counter() - started) * 1000)
        await anyio.to_thread.run_sync(run.remove, run.label)
    return samples


async def _answers(socket: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(socket)), timeout=2.0) as http:
        while True:
            try:
                if (await http.get("http://localhost/json/version")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cold browser did not answer within {READY_TIMEOUT_S:g} s")
            await anyio.sleep(0.01)


async def measure(run: Run, options: Options) -> list[Figure]:
    creates, shots, spec = await _warm(run, options)
    cold = await _cold(run, spec, options)
    return [
        Figure(
            SECTION,
            "warm computer_create (browser connected, page open)",
            samples=creates,
            baseline="cold docker run -d until the browser answers",
            baseline_samples=cold,
            target=Target.speedup(2),
        ),
        Figure(SECTION, "computer_screenshot of a fresh page", samples=shots),
    ]
