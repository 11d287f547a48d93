"""Provisioning: start a template's hardened container, check it, and wipe it for reuse.

The pool decides when; this module knows how, for both kinds of runtime.

A sandbox's command is dockyard's supervisor (root with only SETUID, SETGID and KILL;
everything it runs runs as `agent`, or as a member's own user in a shared sandbox), and it is
ready once the supervisor answers on its control channel. It is fit to hand over only when the
in-image helper finds nothing a previous owner could have left (a process, a file in
/workspace, /tmp, /dev/shm, /dev/mqueue or a home directory, System V IPC objects) and the
image's own filesystem is unchanged: mounted read-only, or else with an empty `docker diff`.

A computer runs Debian's headless Chromium as uid 1000 with no network and no capabilities;
the server reaches its DevTools endpoint through a unix socket in `<data dir>/cdp/<runtime>`,
bind-mounted at /run/dockyard-cdp. It is ready, and healthy, while `/json/version` answers
there. A computer is never wiped: the pool destroys it on release.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from dockyard.config.images.sandbox import protocol
from dockyard.runtime.runtimes.disks import Disks
from dockyard.runtime.runtimes.images import BuildState, ImageService
from dockyard.runtime.runtimes.netguard import NetworkGuard
from dockyard.runtime.runtimes.supervisor import CONTROL_MOUNT, Supervisors
from dockyard.runtime.substrate.docker import ContainerSpec, DockerBackend
from dockyard.runtime.substrate.errors import BackendError, InvalidRequestError
from dockyard.runtime.substrate.settings import Settings, TemplateSettings

__all__ = [
    "CDP_MOUNT",
    "COMPUTER_USER",
    "HOME",
    "MEMBER_USERS",
    "SANDBOX_GID",
    "SANDBOX_UIDS",
    "USER",
    "Provisioner",
    "Started",
]

log = logging.getLogger(__name__)

USER = "agent"
HOME = "/home/agent"
# The sandbox image's users for members of a shared sandbox, one each (uids 1001..1016, group
# `agent`): the server assigns them, the supervisor runs a member's commands as its own.
MEMBER_USERS = tuple(f"m{i}" for i in range(1, 17))
SANDBOX_UIDS = range(1000, 1000 + len(MEMBER_USERS) + 1)  # agent, then each member user
SANDBOX_GID = 1000  # the group `agent`, which owns /workspace
_CHECK_TIMEOUT_S = 30.0
_READY_TIMEOUT_S = 30.0
# What the supervisor needs to act as the sandbox user and to stop that user's processes.
_SUPERVISOR_CAPS = ["SETUID", "SETGID", "KILL"]
# What Docker itself writes into every container's layer: the --init binary it injects.
_DOCKER_MADE = {"C /usr", "C /usr/sbin", "A /usr/sbin/docker-init"}
# A computer's browser runs as the image's `browser` user; nothing in it runs as root.
COMPUTER_USER = "1000:1000"
# Where a computer's image serves the DevTools Protocol (config/images/computer/computer-start).
CDP_MOUNT = "/run/dockyard-cdp"
_CDP_SOCKET = "cdp.sock"
_PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Started:
    """A container just started for a runtime."""

    image: str
    container_id: str
    name: str
    docker_network: str


class Provisioner:
    """Starts, checks, wipes, resizes and removes the containers behind runtimes."""

    def __init__(
        self, settings: Settings, instance: str, docker: DockerBackend, images: ImageService, supervisors: Supervisors
    ) -> None:
        self._settings = settings
        self._instance = instance
        self._docker = docker
        self._images = images
        self.supervisors = supervisors
        self.guard = NetworkGuard(instance)
        self.disks = Disks(settings.data_dir / "disks", docker, instance)

    @property
    def labels(self) -> dict[str, str]:
        """The labels that mark a container or network as this instance's."""
        return {"dockyard.managed": "true", "dockyard.instance": self._instance}

    def template(self, name: str) -> TemplateSettings:
        return self._settings.templates[name]

    async def _check_oci_runtime(self, template: str, wanted: str) -> None:
        """Refuse, before anything is made, a template whose OCI runtime Docker does not have."""
        _default, registered = await self._docker.oci_runtimes()
        if wanted not in registered:
            raise InvalidRequestError(
                f"template '{template}' asks for the OCI runtime '{wanted}', which Docker here does not have "
                f"(it has: {', '.join(registered)}); register it with Docker (see the README on runsc) "
                "or use a template without `runtime`"
            )

    def paused_outside(self, container_id: str) -> bool:
        """Whether someone outside dockyard froze the container (it cannot be wiped then)."""
        return self._docker.paused_outside(container_id)

    def workspace_network(self, workspace_id: str, mode: str = "workspace") -> str:
        """The Docker network of one workspace's sandboxes on `mode` ('workspace' or 'internet')."""
        return f"dockyard-{self._instance}-{'ws' if mode == 'workspace' else 'net'}-{workspace_id}"

    async def wait_image(self, template: str) -> str:
        """The template's image, built first if need be (however long that takes)."""
        return await self._images.ensure(self.template(template).image)

    async def start(
        self,
        runtime_id: str,
        template: str,
        *,
        network: str,
        workspace_id: str | None,
        notify: Callable[[BuildState], Awaitable[None]] | None = None,
    ) -> Started:
        """Start a container for `runtime_id`; waits a while for an image still being built.

        `network` is the runtime's mode; 'workspace' needs the owner's `workspace_id`. A
        computer takes 'none' only.
        """
        tpl = self.template(template)
        if tpl.kind == "computer" and network != "none":
            raise InvalidRequestError(
                f"a computer never has a network (pages reach it through the server); network '{network}' "
                "is not allowed for it, only 'none'"
            )
        image = await self._images.wait_ready(tpl.image, self._settings.images.wait_s, notify)
        if tpl.kind == "computer":
            return await self._start_computer(runtime_id, template, image)
        return await self._start_sandbox(runtime_id, template, image, network, workspace_id)

    async def _start_sandbox(
        self, runtime_id: str, template: str, image: str, network: str, workspace_id: str | None
    ) -> Started:
        tpl = self.template(template)
        docker_network = "none"
        if network != "none":
            # Each workspace has its own bridges, guarded from this host and private ranges.
            if workspace_id is None:
                raise ValueError(f"a runtime on network '{network}' needs its workspace")
            await self.guard.ensure(network)
            docker_network = self.workspace_network(workspace_id, network)
            ws_labels = {**self.labels, "dockyard.workspace": workspace_id}
            await self._docker.ensure_network(
                docker_network,
                ws_labels,
                internal=network == "workspace",
                bridge=self.guard.bridge_name(docker_network),
            )
        if tpl.runtime is not None:
            await self._check_oci_runtime(template, tpl.runtime)
        disk = await self.disks.create(runtime_id, image, tpl.disk_mb)
        spec = ContainerSpec(
            image=image,
            name=self._container_name(runtime_id),
            labels=self._runtime_labels(runtime_id, template, network),
            user="root",
            command=[],  # the image's: the supervisor
            network=docker_network,
            cpus=tpl.cpus,
            memory_mb=tpl.memory_mb,
            pids_limit=tpl.pids_limit,
            tmpfs={
                "/tmp": f"rw,nosuid,nodev,size={tpl.tmp_size_mb}m,mode=1777",
                "/run/dockyard": "rw,nosuid,nodev,noexec,size=1m,mode=755",
            },
            env=dict(tpl.env),
            cap_add=_SUPERVISOR_CAPS,
            binds={str(self.supervisors.prepare(runtime_id)): CONTROL_MOUNT, **disk},
            runtime=tpl.runtime,
        )
        try:
            container_id = await self._docker.run_container(spec)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.supervisors.discard(runtime_id, None)
                await self.disks.remove(runtime_id)
            raise
        started = Started(image, container_id, spec.name, docker_network)
        try:
            await self.supervisors.attach(runtime_id, container_id, _READY_TIMEOUT_S)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.remove(container_id, runtime_id)
            raise
        return started

    async def _start_computer(self, runtime_id: str, template: str, image: str) -> Started:
        """A browser with no network, no capabilities and no root: only its DevTools socket leads in."""
        tpl = self.template(template)
        spec = ContainerSpec(
            image=image,
            name=self._container_name(runtime_id),
            labels=self._runtime_labels(runtime_id, template, "none"),
            user=COMPUTER_USER,
            command=[],  # the image's: computer-start
            network="none",
            cpus=tpl.cpus,
            memory_mb=tpl.memory_mb,
            pids_limit=tpl.pids_limit,
            # The only writable place: the profile, caches and (--disable-dev-shm-usage) the
            # browser's shared memory. Nothing there is ever a program to run.
            tmpfs={"/tmp": f"rw,nosuid,nodev,noexec,size={tpl.tmp_size_mb}m,mode=1777"},
            env=dict(tpl.env),
            binds={str(self._prepare_cdp(runtime_id)): CDP_MOUNT},
        )
        try:
            container_id = await self._docker.run_container(spec)
        except BaseException:
            shutil.rmtree(self._cdp_dir(runtime_id), ignore_errors=True)
            raise
        try:
            await self._wait_for_browser(runtime_id, container_id)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.remove(container_id, runtime_id)
            raise
        return Started(image, container_id, spec.name, "none")

    async def _wait_for_browser(self, runtime_id: str, container_id: str) -> None:
        """Until the browser answers on its socket; at once, with its last words, if it stopped."""
        problem = "no answer yet"
        delay = 0.05
        with anyio.move_on_after(_READY_TIMEOUT_S):
            while True:
                problems = await self._browser_problems(runtime_id)
                if not problems:
                    return
                problem = problems[0]
                if not await self._docker.is_running(container_id):
                    output = await self._docker.logs_tail(container_id, 3)
                    raise BackendError(
                        f"the computer's container stopped before its browser answered: {output or 'it said nothing'}"
                    )
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.5)
        raise BackendError(f"the computer's browser did not answer within {_READY_TIMEOUT_S:g} s: {problem}")

    def cdp_socket(self, runtime_id: str) -> Path:
        """Where, on this host, a computer's DevTools Protocol is served (HTTP and WebSocket)."""
        return self._cdp_dir(runtime_id) / _CDP_SOCKET

    async def browser_version(self, runtime_id: str, timeout_s: float = _PROBE_TIMEOUT_S) -> dict[str, Any]:
        """A computer's `/json/version`: its browser ("Chrome/150..."), protocol and WebSocket URL."""
        with _connectable(self.cdp_socket(runtime_id)) as path:
            transport = httpx.AsyncHTTPTransport(uds=path)
            # Chromium answers only requests whose Host is an IP address or localhost.
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=timeout_s) as http:
                response = await http.get("/json/version")
                response.raise_for_status()
                return dict(response.json())

    async def leftovers(self, container_id: str, runtime_id: str, template: str) -> list[str]:
        """What keeps this runtime from being handed over; empty when it is clean and alive.

        A sandbox is asked for anything a previous owner left; a computer (never reused) only
        whether its browser answers.
        """
        if self.template(template).kind == "computer":
            return await self._browser_problems(runtime_id)
        return await self._sandbox_leftovers(container_id)

    async def _browser_problems(self, runtime_id: str) -> list[str]:
        try:
            version = await self.browser_version(runtime_id)
        except (httpx.HTTPError, OSError, ValueError) as exc:
            return [f"its browser does not answer on its DevTools socket ({str(exc) or type(exc).__name__})"]
        if not str(version.get("Browser", "")).startswith(("Chrome/", "HeadlessChrome/")):
            return [f"its DevTools socket answered without a browser version: {str(version)[:200]}"]
        return []

    async def _sandbox_leftovers(self, container_id: str) -> list[str]:
        answer = await self._helper(container_id, protocol.VERIFY)
        found = list(answer.get("leftovers", ["the helper gave no answer"])) if answer["ok"] else [answer["message"]]
        if not await self._docker.has_read_only_root(container_id):
            # A read-only root cannot change, and `docker diff` walks the whole image on some
            # storage drivers (seconds), so it is only asked where the root is writable.
            changes = [change for change in await self._docker.diff(container_id) if change not in _DOCKER_MADE]
            found += [f"image filesystem changed: {change}" for change in changes[:5]]
        return found

    async def wipe(self, runtime_id: str, container_id: str) -> list[str]:
        """A sandbox: kill the previous owner's processes, empty its places, rotate the control
        key; returns what is still left."""
        answer = await self._helper(container_id, protocol.RESET)
        if not answer["ok"]:
            return [f"reset failed: {answer['message']}"]
        self.supervisors.rotate_key(runtime_id)
        return await self._sandbox_leftovers(container_id)

    async def resize(self, container_id: str, cpus: float, memory_mb: int) -> None:
        """Change a running container's CPU and memory limits."""
        await self._docker.update_limits(container_id, cpus, memory_mb)

    async def start_existing(self, container_id: str) -> None:
        """Start a stopped container again (its volumes are as they were)."""
        await self._docker.start_container(container_id)

    async def remove(self, container_id: str, runtime_id: str | None) -> None:
        """Remove a runtime's container and its host directories (control channel, DevTools socket)."""
        await self._docker.remove_container(container_id)
        if runtime_id:
            await self.supervisors.discard(runtime_id, container_id)
            shutil.rmtree(self._cdp_dir(runtime_id), ignore_errors=True)
            await self.disks.remove(runtime_id)

    def sweep(self, live: set[str]) -> None:
        """Remove the host directories of runtimes that are no longer live (after a crash, say)."""
        self.supervisors.sweep(live)
        if self._cdp_root.is_dir():
            for path in self._cdp_root.iterdir():
                if path.name not in live:
                    shutil.rmtree(path, ignore_errors=True)

    async def remove_network(self, name: str) -> None:
        """Remove a workspace network once no container uses it."""
        await self._docker.remove_network_if_unused(name)

    # -- plumbing -----------------------------------------------------------------------

    def _container_name(self, runtime_id: str) -> str:
        return f"dockyard-{self._instance}-{runtime_id}"

    def _runtime_labels(self, runtime_id: str, template: str, network: str) -> dict[str, str]:
        return {
            **self.labels,
            "dockyard.runtime": runtime_id,
            "dockyard.kind": self.template(template).kind,
            "dockyard.template": template,
            "dockyard.network": network,
        }

    @property
    def _cdp_root(self) -> Path:
        return self._settings.data_dir / "cdp"

    def _cdp_dir(self, runtime_id: str) -> Path:
        return self._cdp_root / runtime_id

    def _prepare_cdp(self, runtime_id: str) -> Path:
        """Create the directory a computer's DevTools socket will appear in; returns it (to bind-mount).

        The browser (uid 1000, no capabilities) must create its socket there whoever runs the
        server, so the directory is open to all (0777); its parent is this server user's alone
        (0700), so no other user of this host can reach the socket.
        """
        self._cdp_root.mkdir(parents=True, exist_ok=True)
        self._cdp_root.chmod(0o700)
        path = self._cdp_dir(runtime_id)
        path.mkdir(exist_ok=True)
        path.chmod(0o777)
        return path

    async def _helper(self, container_id: str, verb: str) -> dict:
        try:
            reply = await self.supervisors.call(container_id, {"t": verb}, timeout_s=_CHECK_TIMEOUT_S)
        except BackendError as exc:
            return {"ok": False, "message": f"could not run the helper: {exc}"}
        if not reply.obj.get("ok"):
            return {"ok": False, "message": f"helper {verb} failed: {reply.obj.get('message', reply.obj)}"}
        return reply.obj


@contextmanager
def _connectable(path: Path) -> Iterator[str]:
    """A path to connect a unix socket by, also one longer than the kernel's 108 bytes (through
    an open handle on its directory)."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)
