"""A disk of fixed size for each sandbox: `/workspace` and `/home` on one small filesystem.

Docker's volumes grow until the host's disk is full, and the size options of its storage
drivers need overlay2 on XFS with project quotas, which fuse-overlayfs (and most hosts) lack.
So each sandbox runtime gets a sparse file of `disk_mb` in the data dir, formatted ext4 and
mounted through a loop device (nosuid, nodev) under `<data dir>/disks/<runtime id>`; its
`workspace` and `home` folders are bind-mounted at `/workspace` and `/home`. A write past the
size fails inside the sandbox with "No space left on device" and the host's free space is
untouched. The folders start as the image has them (owners, modes, the users' homes), copied
once per image from a container that is created and never started.

Mounting needs root (or CAP_SYS_ADMIN) and loop devices; where they are missing, sandboxes
keep Docker's volumes, unbounded, and `doctor` says so.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import anyio

from dockyard.runtime.substrate.docker import DockerBackend

__all__ = ["Disks", "host_check", "release_all"]

log = logging.getLogger(__name__)

PLACES = ("/workspace", "/home")  # on the sandbox's disk, in this order of folders
_MKFS = ["mkfs.ext4", "-F", "-q", "-m", "0", "-J", "size=4", "-E", "lazy_itable_init=1,lazy_journal_init=1"]


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise OSError(f"{argv[0]} failed: {said[-1] if said else f'exit code {done.returncode}'}")


def _release(root: Path, runtime_id: str) -> None:
    """Unmount a runtime's disk (lazily when still busy) and delete it."""
    mount = root / runtime_id
    if os.path.ismount(mount):
        if subprocess.run(["umount", str(mount)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True, check=False)
    if mount.is_dir() and not os.path.ismount(mount):
        shutil.rmtree(mount, ignore_errors=True)
    (root / f"{runtime_id}.img").unlink(missing_ok=True)


def release_all(root: Path, keep: frozenset[str] = frozenset()) -> list[str]:
    """Unmount and delete every disk under `root` but those of `keep`; returns the runtime ids."""
    if not root.is_dir():
        return []
    found = {p.name.removesuffix(".img") for p in root.iterdir() if p.name.startswith("rt_")}
    gone = sorted(found - keep)
    for runtime_id in gone:
        _release(root, runtime_id)
    return gone


def host_check() -> str | None:
    """For `doctor`: what this host lacks for sandbox disks, or None when it has it all."""
    if os.geteuid() != 0:
        return "mounting needs root (or CAP_SYS_ADMIN)"
    for tool in ("mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"the {tool} command is not installed (Debian: e2fsprogs, mount)"
    if not Path("/dev/loop-control").exists():
        return "no loop devices (/dev/loop-control is missing)"
    return None


class Disks:
    """Makes, mounts and removes the per-runtime disks; remembers why it cannot, if it cannot."""

    def __init__(self, root: Path, docker: DockerBackend, instance: str) -> None:
        self._root = root
        self._docker = docker
        # not the runtime labels: this container is no runtime, and is gone a moment later
        self._labels = {"dockyard.export-of": instance}
        self._places: dict[str, Path] = {}  # image id -> tar of its places, as a fresh container has them
        self._lock = anyio.Lock()
        self.problem: str | None = None  # why disks cannot be made here (then: Docker's volumes)

    async def create(self, runtime_id: str, image: str, size_mb: int) -> dict[str, str]:
        """A fresh disk for the runtime, mounted; returns the binds {host folder: path inside}.
        Empty when disks are off (size 0) or cannot be made on this host."""
        if size_mb <= 0 or self.problem is not None:
            return {}
        try:
            places = await self._places_of(image)
            await anyio.to_thread.run_sync(self._make, runtime_id, size_mb, places)
        except OSError as exc:
            await anyio.to_thread.run_sync(_release, self._root, runtime_id)
            if self.problem is None:
                self.problem = str(exc)
                log.warning("sandbox disks are off, sandboxes use Docker's volumes without a size limit: %s", exc)
            return {}
        mount = self._root / runtime_id
        return {str(mount / place.strip("/")): place for place in PLACES}

    async def remove(self, runtime_id: str) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_release, self._root, runtime_id)

    async def sweep(self, live: set[str]) -> None:
        """Remove the disks of runtimes that are no longer live (after a crash, say)."""
        gone = await anyio.to_thread.run_sync(release_all, self._root, frozenset(live))
        for container in await self._docker.list_containers(self._labels):  # an export cut short
            await self._docker.remove_container(container["Id"])
        if gone:
            log.info("removed %d disks of runtimes that are gone", len(gone))

    def describe(self) -> str:
        """For `doctor` and the logs: the mechanism in force."""
        if self.problem is not None:
            return f"missing ({self.problem}): /workspace and /home are Docker volumes without a size limit"
        return "ext4 image per sandbox on a loop device (template disk_mb): a write past it fails with ENOSPC"

    def _make(self, runtime_id: str, size_mb: int, places: Path) -> None:
        self._root.mkdir(parents=True, exist_ok=True, mode=0o700)
        image, mount = self._root / f"{runtime_id}.img", self._root / runtime_id
        with open(image, "wb") as sparse:
            sparse.truncate(size_mb << 20)
        _run(*_MKFS, str(image))
        mount.mkdir(mode=0o700)
        _run("mount", "-o", "loop,nosuid,nodev", str(image), str(mount))
        shutil.rmtree(mount / "lost+found", ignore_errors=True)
        with tarfile.open(places) as tar:  # our own image's places: owners and modes kept
            tar.extractall(mount, numeric_owner=True, filter="fully_trusted")

    async def _places_of(self, image: str) -> Path:
        """The tar of `/workspace` and `/home` as the image has them (made once per image)."""
        async with self._lock:
            image_id = await self._docker.image_id(image)
            cached = self._places.get(image_id)
            if cached is not None and cached.exists():
                return cached
            self._root.mkdir(parents=True, exist_ok=True, mode=0o700)
            target = self._root / f"places-{image_id.removeprefix('sha256:')[:16]}.tar"
            await self._docker.export_paths(image, list(PLACES), target, self._labels)
            self._places[image_id] = target
            return target
