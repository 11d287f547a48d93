"""Runtime images: recipes in `config/images/<name>/`, built on a Debian base, cached by hash.

The base image is pulled where a registry answers; otherwise it is bootstrapped from Debian
packages (`debootstrap` + `docker import`). A recipe is rebuilt only when its files (or the
base) change: each built image carries the hash of its recipe as a label.

A recipe may list Python packages in `wheels.txt` (pip requirement lines). Builds cannot reach
PyPI (only Debian's mirrors answer inside them), so the wheels are downloaded here, on the host,
into `wheels/` of a copy of the recipe, which the Dockerfile installs from without an index.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import anyio
import anyio.abc

from dockyard.runtime.substrate.docker import DockerBackend
from dockyard.runtime.substrate.errors import BackendError, ImageBuildFailedError, ImageBuildingError
from dockyard.runtime.substrate.settings import ImageSettings

__all__ = ["BuildState", "ImageService", "ImageStatus", "packaged_recipes", "recipe_names"]

_HASH_LABEL = "dockyard.recipe-hash"
# What Python, the checkers and editors leave beside a recipe: never part of it (a checkout that
# ran the tests, an installed copy that pip byte-compiled and a fresh clone hash alike).
_NOT_RECIPE = (
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "*.pyc",
    "*.pyo",
    "*~",
    ".*.swp",
    ".DS_Store",
)
_WHEELS = "wheels.txt"
_PYTHON = re.compile(r"^#\s*python:\s*(\d+\.\d+)\s*$")
_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)")


def _in_recipe(relative: Path) -> bool:
    """Whether a file (its path inside the recipe) is part of the recipe rather than a cache."""
    return not any(fnmatch.fnmatch(part, pattern) for part in relative.parts for pattern in _NOT_RECIPE)


def packaged_recipes() -> Path:
    """The recipes shipped with dockyard, in config/images."""
    return Path(str(resources.files("dockyard.config").joinpath("images")))


def recipe_names(root: Path) -> list[str]:
    """The image recipes (folders with a Dockerfile) under `root`."""
    return sorted(p.name for p in root.iterdir() if (p / "Dockerfile").is_file())


@dataclass
class BuildState:
    """What an image build is doing now; watchers poll it for progress."""

    recipe: str
    phase: str = "checking"
    message: str = ""
    step: int = 0
    total: int = 0
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    done: anyio.Event = field(default_factory=anyio.Event)

    def describe(self) -> str:
        where = f"step {self.step}/{self.total}" if self.total else self.phase
        return f"{where}: {self.message}" if self.message else where


@dataclass(frozen=True)
class ImageStatus:
    """Whether a recipe's image exists locally and matches the recipe."""

    recipe: str
    tag: str
    is_present: bool
    is_current: bool


class ImageService:
    """Builds and tracks runtime images; one build per recipe at a time."""

    def __init__(self, settings: ImageSettings, docker: DockerBackend, work_dir: Path) -> None:
        self._settings = settings
        self._docker = docker
        self._work_dir = work_dir
        self._locks: dict[str, anyio.Lock] = {}
        self._states: dict[str, BuildState] = {}
        self._ready: set[str] = set()
        self._task_group: anyio.abc.TaskGroup | None = None
        self._roots = [root for root in (settings.recipes_dir, packaged_recipes()) if root is not None]

    def attach(self, task_group: anyio.abc.TaskGroup) -> None:
        """Give the service a task group for builds that outlive the request that asked."""
        self._task_group = task_group

    @property
    def base_tag(self) -> str:
        return f"{self._settings.prefix}/base:{self._settings.suite}-{self._settings.variant}"

    def tag(self, recipe: str) -> str:
        return f"{self._settings.prefix}/{recipe}:latest"

    def recipe_hash(self, recipe: str) -> str:
        """A digest of the recipe's files and the base it builds on."""
        digest = hashlib.sha256(self.base_tag.encode())
        root = self._recipe_dir(recipe)
        files = (p for p in root.rglob("*") if p.is_file() and _in_recipe(p.relative_to(root)))
        for path in sorted(files):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
        return digest.hexdigest()[:16]

    def _recipe_dir(self, recipe: str) -> Path:
        """The recipe's folder: the configured recipes dir first, then the packaged one."""
        for root in self._roots:
            if (root / recipe / "Dockerfile").is_file():
                return root / recipe
        known = sorted({name for root in self._roots for name in recipe_names(root)})
        raise ImageBuildFailedError(f"no image recipe '{recipe}'; recipes: {', '.join(known)}")

    async def status(self, recipe: str) -> ImageStatus:
        labels = await self._docker.image_labels(self.tag(recipe))
        current = labels is not None and labels.get(_HASH_LABEL) == self.recipe_hash(recipe)
        return ImageStatus(recipe, self.tag(recipe), labels is not None, current)

    def state(self, recipe: str) -> BuildState | None:
        return self._states.get(recipe)

    async def ensure(self, recipe: str) -> str:
        """Build the recipe's image if it is missing or stale; returns its tag."""
        if recipe in self._ready:
            return self.tag(recipe)
        lock = self._locks.setdefault(recipe, anyio.Lock())
        async with lock:
            if recipe in self._ready:
                return self.tag(recipe)
            state = self._states.get(recipe)
            if state is None or state.done.is_set():
                state = self._states[recipe] = BuildState(recipe)
            try:
                if not (await self.status(recipe)).is_current:
                    await self._ensure_base(state)
                    await self._build(recipe, state)
                state.phase, state.message = "ready", ""
                self._ready.add(recipe)
            except (ImageBuildFailedError, BackendError) as exc:
                state.phase, state.error = "failed", str(exc)
                raise
            finally:
                state.done.set()
        return self.tag(recipe)

    def start(self, recipe: str) -> None:
        """Begin building in the background unless a build is running or the image is ready."""
        state = self._states.get(recipe)
        if recipe in self._ready or (state is not None and not state.done.is_set()):
            return
        assert self._task_group is not None, (
            "ImageService.start needs attach() first"
        )  # the engine attaches it at start
        self._states[recipe] = BuildState(recipe)  # visible at once, before the task runs
        self._task_group.start_soon(self._ensure_quietly, recipe)

    async def _ensure_quietly(self, recipe: str) -> None:
        try:
            await self.ensure(recipe)
        except (ImageBuildFailedError, BackendError):
            pass  # recorded in the build state; the next caller sees it and may retry

    async def wait_ready(
        self, recipe: str, wait_s: float, notify: Callable[[BuildState], Awaitable[None]] | None = None
    ) -> str:
        """The recipe's tag once built; builds in the background, reporting while it waits."""
        if recipe in self._ready:
            return self.tag(recipe)
        self.start(recipe)
        state = self._states[recipe]
        with anyio.move_on_after(wait_s):
            while not state.done.is_set():
                with anyio.move_on_after(1.0):
                    await state.done.wait()
                if notify is not None and not state.done.is_set():
                    await notify(state)
        if recipe in self._ready:
            return self.tag(recipe)
        if state.error is not None:
            raise ImageBuildFailedError(f"building the '{recipe}' image failed: {state.error}")
        raise ImageBuildingError(
            f"the '{recipe}' image is still being built ({state.describe()}); a first build takes a few "
            "minutes, try again shortly"
        )

    # -- the base image -----------------------------------------------------------------

    async def _ensure_base(self, state: BuildState) -> None:
        tag = self.base_tag
        if await self._docker.image_labels(tag) is not None:
            return
        state.phase, state.message = "base", f"pulling {self._settings.base_pull}"
        repository, _, version = tag.rpartition(":")
        try:
            with anyio.fail_after(self._settings.pull_timeout_s):
                await self._docker.pull(self._settings.base_pull)
            await self._docker.tag(self._settings.base_pull, repository, version)
            return
        except (BackendError, TimeoutError):
            pass  # no registry: bootstrap from Debian packages instead
        await self._bootstrap(state, repository, version)

    async def _bootstrap(self, state: BuildState, repository: str, version: str) -> None:
        if shutil.which("debootstrap") is None:
            await self._install_debootstrap(state)
        if os.geteuid() != 0:
            raise ImageBuildFailedError(
                "no registry answered and bootstrapping a Debian base with debootstrap needs root; "
                "run `sudo dockyard images build` once"
            )
        self._work_dir.mkdir(parents=True, exist_ok=True)
        rootfs = self._work_dir / f"rootfs-{secrets.token_hex(4)}"
        tarball = rootfs.with_suffix(".tar")
        argv = ["debootstrap", f"--variant={self._settings.variant}", self._settings.suite, str(rootfs)]
        if self._settings.debian_mirror:
            argv.append(self._settings.debian_mirror)
        try:
            state.phase, state.message = "base", f"debootstrap {self._settings.suite}"
            await _run_logged(argv, state)
            state.message = "packing the root filesystem"
            await _run_logged(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], state)
            state.message = "importing the base image"
            await self._docker.import_rootfs(str(tarball), repository, version, ['CMD ["/bin/bash"]'])
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, rootfs, True)
                tarball.unlink(missing_ok=True)

    async def _install_debootstrap(self, state: BuildState) -> None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise ImageBuildFailedError(
                "no registry answered and debootstrap is not installed; install it "
                "(`sudo apt-get install debootstrap`) and run `dockyard images build`"
            )
        state.phase, state.message = "base", "installing debootstrap"
        await _run_logged(["apt-get", "update", "-qq"], state)
        await _run_logged(["apt-get", "install", "-y", "-qq", "debootstrap"], state)

    # -- recipes ------------------------------------------------------------------------

    async def _build(self, recipe: str, state: BuildState) -> None:
        # The hash is of the recipe as written (wheels.txt included), never of downloaded wheels.
        labels = {_HASH_LABEL: self.recipe_hash(recipe), "dockyard.recipe": recipe}
        source = self._recipe_dir(recipe)
        self._work_dir.mkdir(parents=True, exist_ok=True)
        context = self._work_dir / f"recipe-{recipe}-{secrets.token_hex(4)}"
        try:
            # Always a copy, with links followed: an editable install's recipe files are links
            # into the checkout, which a build context would carry as dangling links.
            await anyio.to_thread.run_sync(
                functools.partial(shutil.copytree, source, context, ignore=shutil.ignore_patterns(*_NOT_RECIPE))
            )
            if (context / _WHEELS).is_file():
                await self._download_wheels(recipe, context, state)
            await self._build_context(recipe, context, labels, state)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, context, True)

    async def _download_wheels(self, recipe: str, context: Path, state: BuildState) -> None:
        """Fetch the wheels a recipe lists into `context/wheels`, with this machine's pip (and
        its cache, so a rebuild downloads nothing new)."""
        state.phase, state.message = "wheels", f"downloading the wheels in {recipe}/{_WHEELS}"
        argv = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--only-binary=:all:",
            "--dest",
            str(context / "wheels"),
            "-r",
            str(context / _WHEELS),
            "--progress-bar",
            "off",
            "--disable-pip-version-check",
            "--no-input",
        ]
        # The image's Python, not this one, decides which wheels fit: `# python: 3.11` says it.
        for line in (context / _WHEELS).read_text().splitlines():
            if (found := _PYTHON.match(line)) is not None:
                argv += ["--python-version", found[1], "--implementation", "cp"]
        try:
            await _run_logged(argv, state, "pip download")
        except ImageBuildFailedError as exc:
            raise ImageBuildFailedError(
                f"could not download the Python wheels that {recipe}/{_WHEELS} lists (pip runs on this machine "
                f"and needs to reach its package index): {exc}"
            ) from exc

    async def _build_context(self, recipe: str, context: Path, labels: dict[str, str], state: BuildState) -> None:
        state.phase, state.message = "build", f"building {self.tag(recipe)}"

        def build() -> None:
            for record in self._docker.build_lines(
                str(context), self.tag(recipe), labels, {"BASE_IMAGE": self.base_tag}
            ):
                if "error" in record:
                    raise ImageBuildFailedError(str(record["error"]).strip())
                match = _STEP.match(str(record.get("stream", "")).strip())
                if match:
                    state.step, state.total, state.message = int(match[1]), int(match[2]), match[3][:120]

        await anyio.to_thread.run_sync(build)


async def _run_logged(argv: list[str], state: BuildState, name: str | None = None) -> None:
    """Run a setup command, mirroring its last output line into the build state; errors name
    it as `name` (default: its first two words)."""
    tail: list[str] = []
    async with await anyio.open_process(argv, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        pending = b""
        async for chunk in proc.stdout:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").strip()
                if text:
                    tail = [*tail[-9:], text]
                    state.message = text[:120]
        await proc.wait()
    if proc.returncode != 0:
        detail = " | ".join(tail[-3:])
        raise ImageBuildFailedError(f"`{name or ' '.join(argv[:2])}` exited with {proc.returncode}: {detail}")
