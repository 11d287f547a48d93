"""Benchmark: how much faster a warm-pool claim is than a cold start of a hardened container.

Measured in one run, on the local Docker daemon, all with the same image:
* warm, one at a time: `sandbox_create` on an in-memory dockyard MCP server (pool min 2, max 4),
  timed alone after the pool has settled (a runtime warm, nothing starting or draining);
* warm, 20 in parallel: 20 concurrent `sandbox_create` calls on a pool holding 20 warm runtimes
  (min 20, max 24), each call timed on its own, for `--rounds` rounds;
* cold baselines with the server's hardening (user agent, no capabilities, no-new-privileges,
  read-only root, tmpfs /tmp, init, no network, pids/memory/CPU limits): `docker run -d` through
  the CLI and create + start through the Engine API, one at a time, and 20 `docker run -d` at once.
A warm claim also pays the MCP round trip and the store's writes, so cold p50 / warm p50 errs low.
Everything the run makes (containers, temp dirs) is removed at the end, also on error or Ctrl-C.

Run: `bin/bench`, or e.g. `bin/bench --runs 50 --json out.json`. Takes a minute or two.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import docker
import docker.errors
from mcp import Client
from mcp.types import CallToolResult
from rich.console import Console
from rich.table import Table

from dockyard.runtime.provision import USER
from dockyard.runtime.settings import Settings, TemplateSettings, load_settings
from dockyard.server.app import build_server

T = TypeVar("T")
PARALLEL = 20
WARM_ONE, WARM_MANY = "warm: sandbox_create (MCP)", f"warm: sandbox_create x{PARALLEL} parallel"
COLD_ONE, COLD_MANY = "cold: docker run (CLI)", f"cold: docker run x{PARALLEL} parallel"


class Leftovers:
    """Where the run's containers and files are, and their (blocking, repeatable) removal."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dockyard-bench-"))
        self.label = f"dockyard.bench={secrets.token_hex(6)}"
        self.docker = docker.from_env()

    def remove(self, label: str) -> None:
        """Remove the containers (with their volumes) and networks carrying `label`."""
        api = self.docker.api
        for container in api.containers(all=True, filters={"label": label}):
            try:
                api.remove_container(container["Id"], force=True, v=True)
            except docker.errors.APIError as exc:
                if exc.status_code not in (404, 409):  # gone, or its removal is under way
                    raise
        for network in api.networks(filters={"label": label}):
            api.remove_network(network["Id"])

    def remove_instance(self, data_dir: Path) -> None:
        """Remove what the dockyard instance of this data dir made."""
        if (path := data_dir / "instance-id").is_file():
            self.remove(f"dockyard.instance={path.read_text().strip()}")

    def remove_all(self, grace_s: float) -> None:
        """Remove everything, looking again for `grace_s`: a creation cut short can still land."""
        deadline = time.monotonic() + grace_s
        while True:
            self.remove(self.label)
            for data_dir in self.root.iterdir():
                self.remove_instance(data_dir)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)
        self.docker.close()


def make_settings(data_dir: Path, low: int, high: int) -> Settings:
    # Explicit values, so that POOL_MIN / POOL_MAX in the environment cannot change the shape.
    pool = {"autoscale_enabled": False, "default_min": None, "default_max": None}
    templates = {"default": {"pool": {"min": low, "max": high}}}
    return load_settings(data_dir=data_dir, log_level="WARNING", pool=pool, templates=templates)


def checked(result: CallToolResult) -> dict[str, Any]:
    content: dict[str, Any] | None = result.structured_content
    if result.is_error or content is None:
        raise RuntimeError(f"tool call failed: {result.content}")
    return content


async def pool(client: Client) -> dict[str, Any]:
    return next(p for p in checked(await client.call_tool("pool_status", {}))["pools"] if p["template"] == "default")


async def settle(client: Client, warm_ok: Callable[[int], bool]) -> None:
    """Poll until the pool's warm count is right and nothing is starting or draining."""
    with anyio.fail_after(60):
        while not (warm_ok((p := await pool(client))["warm"]) and p["provisioning"] == p["draining"] == 0):
            await anyio.sleep(0.05)


async def timed(samples: list[float], call: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Await `call(*args)` and append how long it took, in milliseconds, to `samples`."""
    started = time.perf_counter()
    result = await call(*args)
    samples.append((time.perf_counter() - started) * 1000)
    return result


async def claim(client: Client, samples: list[float], ids: list[str]) -> None:
    ids.append(checked(await timed(samples, client.call_tool, "sandbox_create", {}))["sandbox_id"])


async def destroy(client: Client, sandbox_id: str) -> None:
    checked(await client.call_tool("sandbox_destroy", {"sandbox_id": sandbox_id}))


async def warm(left: Leftovers, name: str, shape: tuple[int, int], batch: int, repeats: int) -> tuple[list[float], int]:
    """Time `batch` concurrent claims on a settled pool `repeats` times; also says how many were cold."""
    samples: list[float] = []
    ready: Callable[[int], bool] = (lambda n: n >= 1) if batch == 1 else (lambda n: n == batch)
    settings = make_settings(left.root / name, *shape)
    try:
        async with Client(build_server(settings)) as client:
            for _ in range(repeats):
                await settle(client, ready)
                ids: list[str] = []
                async with anyio.create_task_group() as tg:
                    for _ in range(batch):
                        tg.start_soon(claim, client, samples, ids)
                async with anyio.create_task_group() as tg:  # untimed
                    for sandbox_id in ids:
                        tg.start_soon(destroy, client, sandbox_id)
            await settle(client, ready)
            return samples, (await pool(client))["claims_cold"]
    finally:
        left.remove_instance(settings.data_dir)  # the server's warm runtimes outlive it by design


def docker_run(left: Leftovers, tpl: TemplateSettings, image: str) -> list[str]:
    """`docker run -d` with the hardening of `DockerBackend.run_container` and `Provisioner.start`."""
    return [
        "docker", "run", "-d", "--label", left.label, "--user", USER, "--init", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges:true", "--read-only", "--network", "none", "--ipc", "private",
        "--tmpfs", f"/tmp:rw,nosuid,nodev,size={tpl.tmp_size_mb}m,mode=1777", "--pids-limit", str(tpl.pids_limit),
        "--memory", f"{tpl.memory_mb}m", "--memory-swap", f"{tpl.memory_mb}m", "--cpus", str(tpl.cpus),
        image, "sleep", "infinity",
    ]  # fmt: skip


def sdk_start(left: Leftovers, tpl: TemplateSettings, image: str) -> float:
    """The same container created and started through the Engine API; returns milliseconds."""
    api, started = left.docker.api, time.perf_counter()
    host_config = api.create_host_config(
        init=True, cap_drop=["ALL"], security_opt=["no-new-privileges:true"], pids_limit=tpl.pids_limit,
        mem_limit=f"{tpl.memory_mb}m", memswap_limit=f"{tpl.memory_mb}m", nano_cpus=int(tpl.cpus * 1e9),
        read_only=True, tmpfs={"/tmp": f"rw,nosuid,nodev,size={tpl.tmp_size_mb}m,mode=1777"},
        network_mode="none", ipc_mode="private",
    )  # fmt: skip
    labels = dict([left.label.split("=", 1)])
    created = api.create_container(
        image, command=["sleep", "infinity"], user=USER, labels=labels, host_config=host_config, network_disabled=True
    )
    api.start(created["Id"])
    return (time.perf_counter() - started) * 1000


async def cold(left: Leftovers, runs: int, rounds: int) -> dict[str, list[float]]:
    settings = make_settings(left.root / "baseline", 0, 1)  # for the template's image and limits only
    tpl = settings.templates["default"]
    image = f"{settings.images.prefix}/{tpl.image}:latest"
    command = docker_run(left, tpl, image)
    cli: list[float] = []
    sdk: list[float] = []
    parallel: list[float] = []
    await anyio.run_process(command)  # untimed: warm the daemon's and the page caches
    left.remove(left.label)
    for _ in range(runs):
        await timed(cli, anyio.run_process, command)
        left.remove(left.label)
        sdk.append(await anyio.to_thread.run_sync(sdk_start, left, tpl, image))
        left.remove(left.label)
    for _ in range(rounds):
        async with anyio.create_task_group() as tg:
            for _ in range(PARALLEL):
                tg.start_soon(timed, parallel, anyio.run_process, command)
        left.remove(left.label)
    return {COLD_ONE: cli, "cold: create+start (Engine API)": sdk, COLD_MANY: parallel}


async def measure(args: argparse.Namespace, left: Leftovers) -> dict[str, Any]:
    baselines = await cold(left, args.runs, args.rounds)
    one, one_cold = await warm(left, "one", (2, 4), 1, args.runs)
    many, many_cold = await warm(left, "parallel", (PARALLEL, PARALLEL + 4), PARALLEL, args.rounds)
    rows: list[dict[str, Any]] = []
    p50: dict[str, float] = {}
    for name, values in {WARM_ONE: one, WARM_MANY: many, **baselines}.items():
        cuts = statistics.quantiles(values, n=100, method="inclusive")
        p50[name] = round(cuts[49], 2)
        rows.append({"scenario": name, "n": len(values), "p50_ms": p50[name], "p95_ms": round(cuts[94], 2),
                     "samples_ms": values})  # fmt: skip
    ratios = {"one_at_a_time": p50[COLD_ONE] / p50[WARM_ONE], "parallel_20": p50[COLD_MANY] / p50[WARM_MANY]}
    cold_served = {"one_at_a_time": one_cold, "parallel_20": many_cold}
    return {"results": rows, "cold_p50_over_warm_p50": ratios, "claims_served_cold": cold_served}


def report(data: dict[str, Any]) -> None:
    table = Table(title="dockyard: warm pool claims vs cold container starts")
    for column in ("scenario", "n", "p50 ms", "p95 ms"):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for row in data["results"]:
        table.add_row(row["scenario"], str(row["n"]), f"{row['p50_ms']:.1f}", f"{row['p95_ms']:.1f}")
    ratio, served = data["cold_p50_over_warm_p50"], data["claims_served_cold"]
    console = Console()
    console.print(table)
    console.print(f"cold p50 / warm p50: {ratio['one_at_a_time']:.1f}x one at a time, "
                  f"{ratio['parallel_20']:.1f}x {PARALLEL} in parallel")  # fmt: skip
    console.print(f"claims the pool served cold (should be 0): {served['one_at_a_time']} one at a time, "
                  f"{served['parallel_20']} in parallel")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description="Time warm-pool claims against cold container starts.")
    parser.add_argument("--runs", type=int, default=30, help="samples of each one-at-a-time scenario (>= 2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each 20-in-parallel scenario")
    parser.add_argument("--json", type=Path, help="also write the numbers and machine info to this file")
    args = parser.parse_args()
    if args.runs < 2 or args.rounds < 1:
        parser.error("--runs must be at least 2 and --rounds at least 1")
    left, finished = Leftovers(), False
    try:
        machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                   "docker_server": left.docker.version()["Version"]}  # fmt: skip
        data = anyio.run(measure, args, left)
        finished = True
    finally:
        if not finished:  # a `docker run` killed by Ctrl-C may still be creating its container
            print("dockyard bench: removing the run's containers ...", file=sys.stderr)
        left.remove_all(grace_s=0 if finished else 5)
    report(data)
    if args.json:
        document = {"machine": machine, "runs": args.runs, "rounds": args.rounds, **data}
        args.json.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
