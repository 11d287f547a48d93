"""Exposed ports: a listener on 127.0.0.1 of this machine relays each connection into the
sandbox through its helper, so previews work even for sandboxes with no network at all."""

from __future__ import annotations

import logging
from functools import partial

import anyio
import anyio.abc

from dockyard.runtime.docker import STDOUT, DockerBackend
from dockyard.runtime.errors import BackendError

__all__ = ["PortForwarder"]

log = logging.getLogger(__name__)


class PortForwarder:
    """Owns the host listeners of every exposed sandbox port."""

    def __init__(self, docker: DockerBackend, user: str) -> None:
        self._docker = docker
        self._user = user
        self._task_group: anyio.abc.TaskGroup | None = None
        self._open: dict[str, dict[int, tuple[int, anyio.CancelScope]]] = {}

    def attach(self, task_group: anyio.abc.TaskGroup) -> None:
        self._task_group = task_group

    def ports(self, container_id: str) -> dict[int, int]:
        """Sandbox port -> host port, for one container."""
        return {port: host for port, (host, _) in self._open.get(container_id, {}).items()}

    def container_of(self, host_port: int) -> str | None:
        """The container a loopback port relays to, if it is one of ours."""
        for container_id, ports in self._open.items():
            if any(host == host_port for host, _ in ports.values()):
                return container_id
        return None

    async def open(self, container_id: str, port: int) -> int:
        """Listen on a free loopback port for `port` of the container; returns the host port."""
        existing = self._open.get(container_id, {}).get(port)
        if existing is not None:
            return existing[0]
        if self._task_group is None:
            raise RuntimeError("PortForwarder.open needs attach() first")
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        host_port = listener.extra(anyio.abc.SocketAttribute.local_port)
        scope = await self._task_group.start(self._serve, listener, container_id, port)
        self._open.setdefault(container_id, {})[port] = (host_port, scope)
        return host_port

    def close(self, container_id: str) -> None:
        """Stop every listener of one container."""
        for _, scope in self._open.pop(container_id, {}).values():
            scope.cancel()

    async def _serve(
        self,
        listener: anyio.abc.Listener[anyio.abc.SocketStream],
        container_id: str,
        port: int,
        *,
        task_status: anyio.abc.TaskStatus[anyio.CancelScope],
    ) -> None:
        with anyio.CancelScope() as scope:
            task_status.started(scope)
            async with listener:
                await listener.serve(partial(self._relay, container_id, port))

    async def _relay(self, container_id: str, port: int, client: anyio.abc.SocketStream) -> None:
        try:
            async with client, self._docker.exec_attached(
                container_id, ["dockyard-helper", "connect", str(port)], user=self._user
            ) as channel:
                async with anyio.create_task_group() as tg:

                    async def upstream() -> None:
                        try:
                            async for data in client:
                                await channel.send(data)
                        finally:
                            with anyio.CancelScope(shield=True):
                                await channel.close_stdin()

                    tg.start_soon(upstream)
                    async for kind, chunk in channel.frames():
                        if kind == STDOUT:
                            await client.send(chunk)
                    tg.cancel_scope.cancel()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, BackendError) as exc:
            log.debug("relay to %s:%d ended: %s", container_id[:12], port, exc)
