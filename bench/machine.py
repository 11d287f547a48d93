"""What the figures were measured on: hardware, kernel, Docker, Python and dockyard's commit."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.run import Run

__all__ = ["describe"]

REPO = Path(__file__).resolve().parent.parent


def _proc_field(path: str, key: str) -> str | None:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == key), None)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


def describe(run: Run) -> dict[str, Any]:
    """The machine and software a run measured (blocking)."""
    memory_kb = _proc_field("/proc/meminfo", "MemTotal")
    docker_info = run.docker.info()
    status = _git("status", "--porcelain")
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "memory_mib": int(memory_kb.split()[0]) // 1024 if memory_kb else None,
        "kernel": platform.release(),
        "os": platform.platform(),
        "docker_server": run.docker.version().get("Version"),
        "docker_storage_driver": docker_info.get("Driver"),
        "docker_cgroup_version": docker_info.get("CgroupVersion"),
        "python": platform.python_version(),
        "mcp_sdk": version("mcp"),
        "dockyard_version": version("dockyard"),
        "dockyard_commit": _git("rev-parse", "HEAD"),
        "dockyard_tree_modified": None if status is None else bool(status),
    }
