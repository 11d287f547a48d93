"""One benchmark run: its id, the label on what it makes, its temp dir, and their removal."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
from rich.console import Console

from dockyard.runtime.runtimes.disks import release_all
from dockyard.runtime.runtimes.netguard import remove_rules

__all__ = ["Options", "Run", "say"]

LABEL_KEY = "dockyard.bench.run"


@contextlib.contextmanager
def _gone_or_going() -> Iterator[None]:
    """Let a removal pass when its object is gone (404) or busy being removed or used (409)."""
    try:
        yield
    except docker.errors.APIError as exc:
        if exc.status_code not in (404, 409):
            raise


@dataclass(frozen=True)
class Options:
    """How many samples a run takes."""

    runs: int
    rounds: int


class Run:
    """Where a run's containers, networks and files are, and their (blocking, repeatable) removal.

    Containers the harness starts itself carry `dockyard.bench.run=<run id>`. The dockyard
    servers it starts get data dirs under the run's temp dir and instance ids that begin with
    the run id, so their containers and networks carry `dockyard.instance=<run id><nn>`.
    """

    def __init__(self) -> None:
        self.id = secrets.token_hex(4)
        self.root = Path(tempfile.mkdtemp(prefix=f"dockyard-bench-{self.id}-"))
        self.docker = docker.from_env()
        self._servers = 0

    @property
    def labels(self) -> dict[str, str]:
        """The labels of every container the harness starts itself."""
        return {LABEL_KEY: self.id}

    @property
    def label(self) -> str:
        return f"{LABEL_KEY}={self.id}"

    def data_dir(self, name: str) -> Path:
        """A fresh data dir for one dockyard server of this run.

        Its instance id (which dockyard creates on first use, and which labels and names all
        the server's containers) is set to the run's id and a counter, so `docker ps` shows
        whose they are.
        """
        self._servers += 1
        path = self.root / "data" / name
        path.mkdir(parents=True)
        (path / "instance-id").write_text(f"{self.id}{self._servers:02x}\n")
        return path

    def remove(self, label: str) -> int:
        """Remove the containers (with their volumes) and networks carrying `label`; returns how many containers."""
        api = self.docker.api
        containers = api.containers(all=True, filters={"label": label})
        for container in containers:
            with _gone_or_going():
                api.remove_container(container["Id"], force=True, v=True)
        for network in api.networks(filters={"label": label}):
            with _gone_or_going():  # one still in use goes on the next pass
                api.remove_network(network["Id"])
        return len(containers)

    def remove_instance(self, data_dir: Path) -> int:
        """Remove what the dockyard instance of this data dir made (warm runtimes outlive a server)."""
        path = data_dir / "instance-id"
        if not path.is_file():
            return 0
        instance = path.read_text().strip()
        removed = self.remove(f"dockyard.instance={instance}")
        release_all(data_dir / "disks")  # the sandboxes' disks, mounted on this machine
        remove_rules(instance)  # and the firewall rules of its networks
        return removed

    def close(self, grace_s: float) -> int:
        """Remove everything, looking again for `grace_s`: a creation cut short can still land."""
        removed = 0
        deadline = time.monotonic() + grace_s
        while True:
            removed += self.remove(self.label)
            data = self.root / "data"
            for data_dir in sorted(data.iterdir()) if data.is_dir() else []:
                removed += self.remove_instance(data_dir)
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        shutil.rmtree(self.root, ignore_errors=True)
        self.docker.close()
        return removed


_progress = Console(stderr=True, highlight=False)


def say(message: str) -> None:
    """A progress or warning line on stderr (stdout carries only the table)."""
    _progress.print(message)
