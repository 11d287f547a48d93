"""A disk of fixed size for each sandbox: `/workspace` and `/home` on one small filesystem.

Docker's volumes grow until the host's disk is full, and the size options of its storage
drivers need overlay2 on XFS with project quotas, which fuse-overlayfs (and most hosts) lack.
So each sandbox runtime gets a sparse file of `disk_mb` in the data dir, formatted ext4 and
mounted through a loop device (nosuid, nodev) under `<data dir>/disks/<runtime id>`; its
`workspace` and `home` folders are bind-mounted at `/workspace` and `/home`. A write past the
size fails inside the sandbox with "No space left on device" and the host's free space is
untouched. The folders start as the image has them (owners, modes, the users' homes): they
are copied once per image, from a container that is created and never started, into a blank
disk of each size, and a runtime's disk is a sparse copy of that blank, mounted (no formatting
and no extraction on the way to a warm runtime).

Mounting needs root (or CAP_SYS_ADMIN) and loop devices; where they are missing, sandboxes
keep Docker's volumes, unbounded, and `doctor` says so.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import anyio

from dockyard.runtime.substrate.docker import DockerBackend

__all__ = ["Disks", "host_check", "release_all"]

log = logging.getLogger(__name__)

PLACES = ("/workspace", "/home")  # on the sandbox's disk, in this order of folders
_PARTIAL = ".partial-"  # a blank disk being made, and where it is mounted meanwhile
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


def _sweep_partial(root: Path) -> None:
    """Remove blank disks cut short by a crash, and unmount where they were being filled."""
    for path in root.glob(f"{_PARTIAL}*") if root.is_dir() else []:
        if path.is_dir():
            if os.path.ismount(path):
                subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


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
        self._blanks: dict[tuple[str, int], Path] = {}  # (image id, size) -> its blank disk
        self._lock = anyio.Lock()
        self.problem: str | None = None  # why disks cannot be made here (then: Docker's volumes)

    async def create(self, runtime_id: str, image: str, size_mb: int) -> dict[str, str]:
        """A fresh disk for the runtime, mounted; returns the binds {host folder: path inside}.
        Empty when disks are off (size 0) or cannot be made on this host."""
        if size_mb <= 0 or self.problem is not None:
            return {}
        try:
            blank = await self._blank_of(image, size_mb)
            await anyio.to_thread.run_sync(self._make, runtime_id, blank)
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
        await anyio.to_thread.run_sync(_sweep_partial, self._root)
        for container in await self._docker.list_containers(self._labels):  # an export cut short
            await self._docker.remove_container(container["Id"])
        if gone:
            log.info("removed %d disks of runtimes that are gone", len(gone))

    def describe(self) -> str:
        """For `doctor` and the logs: the mechanism in force."""
        if self.problem is not None:
            return f"missing ({self.problem}): /workspace and /home are Docker volumes without a size limit"
        return "ext4 image per sandbox on a loop device (template disk_mb): a write past it fails with ENOSPC"

    def _make(self, runtime_id: str, blank: Path) -> None:
        """The runtime's disk: a sparse copy of the blank (a few milliseconds, no formatting and
        no extraction on the way to a warm runtime), mounted."""
        image, mount = self._root / f"{runtime_id}.img", self._root / runtime_id
        _run("cp", "--sparse=always", "--reflink=auto", str(blank), str(image))
        mount.mkdir(mode=0o700)
        _run("mount", "-o", "loop,nosuid,nodev", str(image), str(mount))

    async def _blank_of(self, image: str, size_mb: int) -> Path:
        """A disk of `size_mb`, formatted, holding `/workspace` and `/home` as the image has them
        (owners, modes, the users' homes): made once per image and size, then copied."""
        async with self._lock:
            image_id = await self._docker.image_id(image)
            cached = self._blanks.get((image_id, size_mb))
            if cached is not None and cached.exists():
                return cached
            self._root.mkdir(parents=True, exist_ok=True, mode=0o700)
            name = image_id.removeprefix("sha256:")[:16]
            places = self._root / f"places-{name}.tar"
            if not places.exists():
                await self._docker.export_paths(image, list(PLACES), places, self._labels)
            blank = self._root / f"blank-{name}-{size_mb}.img"
            await anyio.to_thread.run_sync(_make_blank, blank, size_mb, places)
            self._blanks[(image_id, size_mb)] = blank
            return blank


def _make_blank(blank: Path, size_mb: int, places: Path) -> None:
    """Format a sparse file of `size_mb` as ext4 and extract the places into it, then publish it
    as `blank` (a rename: a blank cut short by a crash is never used)."""
    partial = blank.with_name(f"{_PARTIAL}{blank.name}")
    mount = Path(tempfile.mkdtemp(prefix=_PARTIAL, dir=blank.parent))
    try:
        with open(partial, "wb") as sparse:
            sparse.truncate(size_mb << 20)
        _run(*_MKFS, str(partial))
        _run("mount", "-o", "loop,nosuid,nodev", str(partial), str(mount))
        try:
            shutil.rmtree(mount / "lost+found", ignore_errors=True)
            with tarfile.open(places) as tar:  # our own image's places: owners and modes kept
                tar.extractall(mount, numeric_owner=True, filter="fully_trusted")
        finally:
            _run("umount", str(mount))
        os.replace(partial, blank)
    finally:
        partial.unlink(missing_ok=True)
        mount.rmdir()
