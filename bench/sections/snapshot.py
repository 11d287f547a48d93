"""snapshot: sandbox_snapshot after 100 MiB of /workspace changed, beside a tar read of the same data."""

from __future__ import annotations

import time

import anyio

from bench.figures import Figure
from bench.run import Options, Run
from bench.served import Served, serve, timed

__all__ = ["measure"]

SECTION = "snapshot"
CHANGE = "head -c 100M /dev/urandom > blob"  # 100 MiB that no compression or dedup can shrink
CHANGED_BYTES = 100 << 20


def _tar_read(run: Run, container_id: str) -> tuple[float, int]:
    """Read /workspace as a tar stream through the Engine API (blocking); returns (ms, bytes)."""
    started, size = time.perf_counter(), 0
    chunks, _ = run.docker.api.get_archive(container_id, "/workspace/.")
    for chunk in chunks:
        size += len(chunk)
    return (time.perf_counter() - started) * 1000, size


async def _snapshot(served: Served, sandbox_id: str) -> int:
    """Take a snapshot; returns its size in bytes."""
    return int((await served.call("sandbox_snapshot", sandbox_id=sandbox_id, label="bench"))["size_bytes"])


async def measure(run: Run, options: Options) -> list[Figure]:
    """Each run rewrites the 100 MiB, then times the snapshot and the tar read, in turns."""
    ours: list[float] = []
    tar: list[float] = []
    sizes: list[int] = []
    async with serve(run, "snapshot", pool_min=2, pool_max=4) as served:
        await served.settle(lambda warm: warm >= 2)
        sandbox_id = (await served.call("sandbox_create"))["sandbox_id"]
        await served.settle(lambda warm: warm >= 2)
        container_id = await anyio.to_thread.run_sync(served.container_of, run, sandbox_id)
        for index in range(max(3, options.runs // 10)):
            written = await served.call("sandbox_exec", sandbox_id=sandbox_id, command=f"{CHANGE} && stat -c %s blob")
            if written["exit_code"] != 0 or int(written["stdout"]) != CHANGED_BYTES:
                raise RuntimeError(f"writing 100 MiB into /workspace failed: {written['stderr'] or written['stdout']}")
            if index % 2:  # take turns at going first, so neither always meets a colder cache
                tar.append((await anyio.to_thread.run_sync(_tar_read, run, container_id))[0])
                sizes.append(await timed(ours, _snapshot, served, sandbox_id))
            else:
                sizes.append(await timed(ours, _snapshot, served, sandbox_id))
                tar.append((await anyio.to_thread.run_sync(_tar_read, run, container_id))[0])
        await served.call("sandbox_destroy", sandbox_id=sandbox_id)
    return [
        Figure(
            SECTION,
            "sandbox_snapshot per 100 MiB changed",
            samples=ours,
            baseline="get_archive of /workspace, tar stream (Engine API)",
            baseline_samples=tar,
            details={"changed_bytes": CHANGED_BYTES, "snapshot_size_bytes": sizes},
        )
    ]
