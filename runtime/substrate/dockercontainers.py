"""Containers: run, remove, pause, inspect and watch the runtimes' containers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import docker.errors
import httpx

from dockyard.runtime.substrate.dockerapi import UNREACHABLE, DockerConnection
from dockyard.runtime.substrate.errors import BackendError, ContainerGoneError, DockerUnavailableError

__all__ = ["ContainerCalls", "ContainerSpec"]


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to start one hardened runtime container."""

    image: str
    name: str
    labels: dict[str, str]
    user: str
    command: list[str]
    network: str
    cpus: float
    memory_mb: int
    pids_limit: int
    tmpfs: dict[str, str]
    env: dict[str, str] = field(default_factory=dict)
    read_only: bool = True
    cap_add: list[str] = field(default_factory=list)
    binds: dict[str, str] = field(default_factory=dict)  # host directory -> path inside
    runtime: str | None = None  # the OCI runtime registered with Docker (e.g. runsc); None: Docker's default


class ContainerCalls(DockerConnection):
    """The calls on containers, and which of them this process paused."""

    def __init__(self, docker_host: str, timeout_s: float) -> None:
        super().__init__(docker_host, timeout_s)
        self._pausing: set[str] = set()  # containers this process paused (for a snapshot)
        self._paused_outside: set[str] = set()  # containers seen paused by someone else

    async def run_container(self, spec: ContainerSpec) -> str:
        """Create and start a hardened container; on a failed start nothing is left behind."""

        def create() -> str:
            api = self.client.api
            host_config = api.create_host_config(
                init=True,
                cap_drop=["ALL"],
                cap_add=spec.cap_add or None,
                binds={host: {"bind": inside, "mode": "rw"} for host, inside in spec.binds.items()} or None,
                security_opt=["no-new-privileges:true"],
                pids_limit=spec.pids_limit,
                mem_limit=f"{spec.memory_mb}m",
                memswap_limit=f"{spec.memory_mb}m",
                nano_cpus=int(spec.cpus * 1e9),
                read_only=spec.read_only,
                tmpfs=spec.tmpfs,
                network_mode=spec.network,
                ipc_mode="private",
                runtime=spec.runtime,
            )
            created = api.create_container(
                spec.image,
                command=spec.command or None,
                name=spec.name,
                user=spec.user,
                labels=spec.labels,
                environment=spec.env,
                host_config=host_config,
                network_disabled=spec.network == "none",
            )
            container_id: str = created["Id"]
            try:
                api.start(container_id)
            except BaseException:
                api.remove_container(container_id, force=True, v=True)
                raise
            return container_id

        return await self._run(create)

    async def remove_container(self, container_id: str) -> None:
        """Remove a container and its anonymous volumes; a missing one is not an error."""

        def remove() -> None:
            try:
                self.client.api.remove_container(container_id, force=True, v=True)
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: a removal is already under way
                    raise

        try:
            await self._run(remove)
        except ContainerGoneError:
            pass

    async def start_container(self, container_id: str) -> None:
        await self._run(self.client.api.start, container_id)

    async def pause(self, container_id: str) -> None:
        """Freeze a container; it counts as paused by dockyard until `unpause`."""
        self._pausing.add(container_id)
        try:
            await self._run(self.client.api.pause, container_id)
        except BaseException:
            self._pausing.discard(container_id)
            raise

    async def unpause(self, container_id: str) -> None:
        await self._run(self.client.api.unpause, container_id)
        self._pausing.discard(container_id)

    def paused_here(self, container_id: str) -> bool:
        """Whether this process paused the container (a snapshot), as opposed to someone outside."""
        return container_id in self._pausing

    def seen_paused(self, container_id: str, paused: bool) -> bool:
        """Record whether the container was seen paused by someone else; True when that is news."""
        if paused and container_id not in self._pausing:
            if container_id in self._paused_outside:
                return False
            self._paused_outside.add(container_id)
            return True
        self._paused_outside.discard(container_id)
        return False

    def paused_outside(self, container_id: str) -> bool:
        """Whether the container is frozen by someone other than dockyard (`docker pause`)."""
        return container_id in self._paused_outside

    async def update_limits(self, container_id: str, cpus: float, memory_mb: int) -> None:
        """Change a running container's CPU quota and memory limit (swap kept equal to it)."""
        # docker-py's update_container has no NanoCpus (the unit containers are created with,
        # which the daemon will not mix with a CPU quota), so the request is made directly.
        body = {"NanoCpus": int(cpus * 1e9), "Memory": memory_mb << 20, "MemorySwap": memory_mb << 20}

        def update() -> None:
            api = self.client.api
            url = api._url("/containers/{0}/update", container_id)  # type: ignore[attr-defined]  # noqa: SLF001 - no public call sets NanoCpus
            response = api._post_json(url, data=body)  # type: ignore[attr-defined]  # noqa: SLF001 - as above
            api._raise_for_status(response)  # type: ignore[attr-defined]  # noqa: SLF001 - as above

        await self._run(update)

    async def container_labels(self, container_id: str) -> dict[str, str] | None:
        """A container's labels; None when there is no such container."""
        try:
            info = await self._run(self.client.api.inspect_container, container_id)
        except ContainerGoneError:
            return None
        return dict(info["Config"].get("Labels") or {})

    async def is_running(self, container_id: str) -> bool:
        """Whether the container exists and is running."""
        try:
            info = await self._run(self.client.api.inspect_container, container_id)
        except ContainerGoneError:
            return False
        return bool(info["State"].get("Running"))

    async def state(self, container_id: str) -> str | None:
        """The container's status now ("running", "paused", "exited", ...), None once it is gone."""
        try:
            info = await self._run(self.client.api.inspect_container, container_id)
        except ContainerGoneError:
            return None
        return str(info["State"].get("Status"))

    async def logs_tail(self, container_id: str, lines: int) -> str:
        """The container's last output lines (stdout and stderr), to say why it stopped."""
        try:
            data = await self._run(self.client.api.logs, container_id, stdout=True, stderr=True, tail=lines)
        except ContainerGoneError:
            return ""
        return cast(bytes, data).decode(errors="replace").strip()  # not streamed: the whole log in bytes

    async def has_read_only_root(self, container_id: str) -> bool:
        info = await self._run(self.client.api.inspect_container, container_id)
        return bool(info["HostConfig"].get("ReadonlyRootfs"))

    async def diff(self, container_id: str) -> list[str]:
        """Changes to the container's own filesystem layer ('C /etc/passwd', 'A /x', ...)."""
        changes = await self._run(self.client.api.diff, container_id) or []
        kinds = {0: "C", 1: "A", 2: "D"}
        return [f"{kinds.get(change['Kind'], '?')} {change['Path']}" for change in changes]

    async def events(self, labels: dict[str, str], actions: list[str]) -> AsyncIterator[dict[str, Any]]:
        """Yield the daemon's container events for containers carrying these labels, as they happen."""
        filters = {"type": ["container"], "label": [f"{k}={v}" for k, v in labels.items()], "event": actions}
        version = await self._run(lambda: self.client.api.api_version)
        try:
            async with (
                self._http() as http,
                http.stream("GET", f"/v{version}/events", params={"filters": json.dumps(filters)}) as response,
            ):
                if response.status_code != 200:
                    raise BackendError(f"docker: events stream refused ({response.status_code})")
                async for line in response.aiter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError as exc:
            raise DockerUnavailableError(UNREACHABLE) from exc

    async def list_containers(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        """Every container (running or not) carrying all of these labels."""
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        return await self._run(self.client.api.containers, all=True, filters=filters)
