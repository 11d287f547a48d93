"""Baseline containers: plain `sleep infinity` containers with a sandbox's image and hardening.

The hardening is read off a container dockyard started in the same run, so the baselines
follow whatever the server does today instead of a copy of it that could drift.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bench.run import Run

__all__ = ["Hardening", "cli_run_argv", "engine_api_start", "memory_mib"]

MIB = 1 << 20


@dataclass(frozen=True)
class Hardening:
    """A container's image, user, limits and confinement, as Docker reports them."""

    image: str
    user: str
    init: bool
    cap_drop: list[str]
    security_opt: list[str]
    read_only: bool
    network_mode: str
    ipc_mode: str
    tmpfs: dict[str, str]
    pids_limit: int
    memory: int
    memory_swap: int
    nano_cpus: int

    @classmethod
    def of(cls, run: Run, container_id: str) -> Hardening:
        """The hardening of a running container (blocking)."""
        info: dict[str, Any] = run.docker.api.inspect_container(container_id)
        host, config = info["HostConfig"], info["Config"]
        return cls(
            image=info["Image"],
            user=config.get("User") or "",
            init=bool(host.get("Init")),
            cap_drop=list(host.get("CapDrop") or []),
            security_opt=list(host.get("SecurityOpt") or []),
            read_only=bool(host.get("ReadonlyRootfs")),
            network_mode=host.get("NetworkMode") or "none",
            ipc_mode=host.get("IpcMode") or "private",
            tmpfs=dict(host.get("Tmpfs") or {}),
            pids_limit=int(host.get("PidsLimit") or 0),
            memory=int(host.get("Memory") or 0),
            memory_swap=int(host.get("MemorySwap") or 0),
            nano_cpus=int(host.get("NanoCpus") or 0),
        )


def cli_run_argv(run: Run, spec: Hardening) -> list[str]:
    """`docker run -d ... sleep infinity` with the spec's hardening and the run's label."""
    argv = ["docker", "run", "-d", "--label", run.label, "--network", spec.network_mode, "--ipc", spec.ipc_mode]
    if spec.user:
        argv += ["--user", spec.user]
    if spec.init:
        argv.append("--init")
    if spec.read_only:
        argv.append("--read-only")
    for cap in spec.cap_drop:
        argv += ["--cap-drop", cap]
    for option in spec.security_opt:
        argv += ["--security-opt", option]
    for path, options in spec.tmpfs.items():
        argv += ["--tmpfs", f"{path}:{options}" if options else path]
    if spec.pids_limit > 0:
        argv += ["--pids-limit", str(spec.pids_limit)]
    if spec.memory:
        argv += ["--memory", f"{spec.memory}b", "--memory-swap", f"{spec.memory_swap}b"]
    if spec.nano_cpus:
        argv += ["--cpus", f"{spec.nano_cpus / 1e9:g}"]
    return [*argv, spec.image, "sleep", "infinity"]


def engine_api_start(run: Run, spec: Hardening) -> float:
    """The same container created and started through the Engine API (blocking); returns milliseconds."""
    api, started = run.docker.api, time.perf_counter()
    host_config = api.create_host_config(
        init=spec.init or None,
        cap_drop=spec.cap_drop or None,
        security_opt=spec.security_opt or None,
        pids_limit=spec.pids_limit or None,
        mem_limit=spec.memory or None,
        memswap_limit=spec.memory_swap or None,
        nano_cpus=spec.nano_cpus or None,
        read_only=spec.read_only,
        tmpfs=spec.tmpfs or None,
        network_mode=spec.network_mode,
        ipc_mode=spec.ipc_mode,
    )
    created = api.create_container(
        spec.image,
        command=["sleep", "infinity"],
        user=spec.user or None,
        labels=run.labels,
        host_config=host_config,
        network_disabled=spec.network_mode == "none",
    )
    api.start(created["Id"])
    return (time.perf_counter() - started) * 1000


def memory_mib(run: Run, container_id: str) -> float:
    """The container's memory usage as `docker stats` shows it: cgroup usage less inactive file cache."""
    memory = run.docker.api.stats(container_id, stream=False, one_shot=True)["memory_stats"]
    usage, stats = int(memory["usage"]), memory.get("stats") or {}
    for key in ("total_inactive_file", "inactive_file"):  # cgroup v1, then v2
        if key in stats and int(stats[key]) < usage:
            return (usage - int(stats[key])) / MIB
    return usage / MIB
