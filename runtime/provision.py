"""Provisioning: start a template's hardened container, check it, and wipe it for reuse.

The pool decides when; this module knows how. Each container's command is dockyard's
supervisor (root with only SETUID, SETGID and KILL; everything it runs runs as `agent`), and a
runtime is ready once the supervisor answers on its control channel. A runtime is fit to hand
over only when the in-image helper finds nothing a previous owner could have left (a process, a file in
/workspace, /tmp, /dev/shm, /dev/mqueue or the home directory, System V IPC objects) and the
image's own filesystem is unchanged: mounted read-only, or else with an empty `docker diff`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from dockyard.runtime.docker import ContainerSpec, DockerBackend
from dockyard.runtime.errors import BackendError
from dockyard.runtime.images import BuildState, ImageService
from dockyard.runtime.settings import Settings, TemplateSettings
from dockyard.runtime.supervisor import CONTROL_MOUNT, Supervisors

__all__ = ["Provisioner", "USER", "HOME", "Started"]

log = logging.getLogger(__name__)

USER = "agent"
HOME = "/home/agent"
_CHECK_TIMEOUT_S = 30.0
_READY_TIMEOUT_S = 30.0
# What the supervisor needs to act as the sandbox user and to stop that user's processes.
_SUPERVISOR_CAPS = ["SETUID", "SETGID", "KILL"]
# What Docker itself writes into every container's layer: the --init binary it injects.
_DOCKER_MADE = {"C /usr", "C /usr/sbin", "A /usr/sbin/docker-init"}


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

    @property
    def labels(self) -> dict[str, str]:
        """The labels that mark a container or network as this instance's."""
        return {"dockyard.managed": "true", "dockyard.instance": self._instance}

    def template(self, name: str) -> TemplateSettings:
        return self._settings.templates[name]

    def workspace_network(self, workspace_id: str) -> str:
        return f"dockyard-{self._instance}-ws-{workspace_id}"

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

        `network` is the runtime's mode; 'workspace' needs the owner's `workspace_id`.
        """
        tpl = self.template(template)
        image = await self._images.wait_ready(tpl.image, self._settings.images.wait_s, notify)
        docker_network = {"none": "none", "internet": "bridge"}.get(network)
        if docker_network is None:
            if workspace_id is None:
                raise ValueError("a workspace-network runtime needs its workspace")
            docker_network = self.workspace_network(workspace_id)
            ws_labels = {**self.labels, "dockyard.workspace": workspace_id}
            await self._docker.ensure_network(docker_network, ws_labels, internal=True)
        spec = ContainerSpec(
            image=image,
            name=f"dockyard-{self._instance}-{runtime_id}",
            labels={
                **self.labels,
                "dockyard.runtime": runtime_id,
                "dockyard.kind": "sandbox",
                "dockyard.template": template,
                "dockyard.network": network,
            },
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
            binds={str(self.supervisors.prepare(runtime_id)): CONTROL_MOUNT},
        )
        try:
            container_id = await self._docker.run_container(spec)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.supervisors.discard(runtime_id, None)
            raise
        started = Started(image, container_id, spec.name, docker_network)
        try:
            await self.supervisors.attach(runtime_id, container_id, _READY_TIMEOUT_S)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.remove(container_id, runtime_id)
            raise
        return started

    async def leftovers(self, container_id: str) -> list[str]:
        """What keeps this runtime from being handed over; empty when it is clean and alive."""
        answer = await self._helper(container_id, "verify")
        found = list(answer.get("leftovers", ["the helper gave no answer"])) if answer["ok"] else [answer["message"]]
        if not await self._docker.has_read_only_root(container_id):
            # A read-only root cannot change, and `docker diff` walks the whole image on some
            # storage drivers (seconds), so it is only asked where the root is writable.
            changes = [change for change in await self._docker.diff(container_id) if change not in _DOCKER_MADE]
            found += [f"image filesystem changed: {change}" for change in changes[:5]]
        return found

    async def wipe(self, runtime_id: str, container_id: str) -> list[str]:
        """Kill the previous owner's processes, empty its places, rotate the control key;
        returns what is still left."""
        answer = await self._helper(container_id, "reset")
        if not answer["ok"]:
            return [f"reset failed: {answer['message']}"]
        self.supervisors.rotate_key(runtime_id)
        return await self.leftovers(container_id)

    async def resize(self, container_id: str, cpus: float, memory_mb: int) -> None:
        """Change a running container's CPU and memory limits."""
        await self._docker.update_limits(container_id, cpus, memory_mb)

    async def start_existing(self, container_id: str) -> None:
        """Start a stopped container again (its volumes are as they were)."""
        await self._docker.start_container(container_id)

    async def remove(self, container_id: str, runtime_id: str | None) -> None:
        """Remove a runtime's container and its control directory."""
        await self._docker.remove_container(container_id)
        if runtime_id:
            await self.supervisors.discard(runtime_id, container_id)

    async def remove_network(self, name: str) -> None:
        """Remove a workspace network once no container uses it."""
        await self._docker.remove_network_if_unused(name)

    async def _helper(self, container_id: str, verb: str) -> dict:
        try:
            reply = await self.supervisors.call(container_id, {"t": verb}, timeout_s=_CHECK_TIMEOUT_S)
        except BackendError as exc:
            return {"ok": False, "message": f"could not run the helper: {exc}"}
        if not reply.obj.get("ok"):
            return {"ok": False, "message": f"helper {verb} failed: {reply.obj.get('message', reply.obj)}"}
        return reply.obj
