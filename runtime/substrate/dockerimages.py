"""Networks and images: the workspaces' bridge networks, and the images runtimes start from."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import docker.errors

from dockyard.runtime.substrate.dockerapi import DockerConnection, docker_errors
from dockyard.runtime.substrate.errors import BackendError, ContainerGoneError

__all__ = ["ImageCalls", "NetworkCalls"]


class NetworkCalls(DockerConnection):
    """The calls on bridge networks."""

    async def ensure_network(self, name: str, labels: dict[str, str], *, internal: bool, bridge: str) -> None:
        """Create a bridge network (its host interface named `bridge`) unless one of that name exists."""

        def ensure() -> None:
            # Docker's name filter matches parts of names too: only an exact one counts.
            if any(net["Name"] == name for net in self.client.api.networks(names=[name])):
                return
            try:
                self.client.api.create_network(
                    name,
                    driver="bridge",
                    internal=internal,
                    labels=labels,
                    options={"com.docker.network.bridge.name": bridge},
                )
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: made a moment ago by a claim racing this one
                    raise

        await self._run(ensure)

    async def remove_network_if_unused(self, name: str) -> None:
        def remove() -> None:
            for net in self.client.api.networks(names=[name]):
                detail = self.client.api.inspect_network(net["Id"])
                if not detail.get("Containers"):
                    self.client.api.remove_network(net["Id"])

        try:
            await self._run(remove)
        except BackendError:
            pass  # still in use by a container being created: the next destroy retries

    async def list_networks(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        return await self._run(self.client.api.networks, filters=filters)


class ImageCalls(DockerConnection):
    """The calls on images: inspect, pull, tag, import and build."""

    async def image_labels(self, tag: str) -> dict[str, str] | None:
        """The labels of a local image, or None if there is no such image."""
        try:
            info = await self._run(self.client.api.inspect_image, tag)
        except ContainerGoneError:
            return None
        return (info.get("Config") or {}).get("Labels") or {}

    async def pull(self, ref: str) -> None:
        await self._run(self.client.api.pull, ref)

    async def image_id(self, tag: str) -> str:
        """The id of a local image."""
        info = await self._run(self.client.api.inspect_image, tag)
        return str(info["Id"])

    async def tag(self, image: str, repository: str, tag: str) -> None:
        await self._run(self.client.api.tag, image, repository, tag, force=True)

    async def import_rootfs(self, tar_path: str, repository: str, tag: str, changes: list[str]) -> None:
        """Import a root filesystem tarball as an image."""

        def load() -> None:
            with open(tar_path, "rb") as fh:
                self.client.api.import_image(src=fh, repository=repository, tag=tag, changes=changes)

        await self._run(load)

    def build_lines(self, context: str, tag: str, labels: dict[str, str], buildargs: dict[str, str]) -> Iterator[dict]:
        """Blocking: build an image and yield the daemon's JSON progress records."""
        with docker_errors():
            yield from self.client.api.build(
                path=context, tag=tag, labels=labels, buildargs=buildargs, rm=True, forcerm=True, decode=True
            )
