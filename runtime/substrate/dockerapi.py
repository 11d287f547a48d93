"""The connection to the Docker daemon that every part of the Docker backend shares.

docker-py is blocking, so every call hops to a worker thread (`DockerConnection._run`), and
docker-py's errors are translated into the engine's error tree here, at that one boundary:
the other modules of the backend only ever see `DockyardError`s from it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlparse

import anyio
import docker
import docker.errors
import httpx
import requests.exceptions

from dockyard.runtime.substrate.errors import BackendError, ContainerGoneError, DockerUnavailableError

__all__ = ["UNREACHABLE", "DockerConnection", "docker_errors", "translate"]

T = TypeVar("T")

UNREACHABLE = (
    "the Docker daemon is not reachable; start it (e.g. `sudo systemctl start docker`) and check `dockyard doctor`"
)


@contextmanager
def docker_errors() -> Iterator[None]:
    """Map docker-py's errors onto the engine's error tree."""
    try:
        yield
    except docker.errors.NotFound as exc:
        raise ContainerGoneError(f"docker: {exc.explanation or exc}") from exc
    except docker.errors.APIError as exc:
        raise BackendError(f"docker: {exc.explanation or exc}") from exc
    except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
        raise DockerUnavailableError(UNREACHABLE) from exc


def translate(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, with docker-py's errors mapped as `docker_errors` does."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with docker_errors():
            return fn(*args, **kwargs)

    return wrapper


class DockerConnection:
    """One docker-py client, reached off the event loop, and the Engine API over async HTTP."""

    def __init__(self, docker_host: str, timeout_s: float) -> None:
        self._host = docker_host
        self._timeout_s = timeout_s
        self._client: docker.DockerClient | None = None
        # Exec and archive calls are many and short; give them room beyond anyio's default pool.
        self._limiter = anyio.CapacityLimiter(64)

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = translate(docker.DockerClient)(base_url=self._host, timeout=int(self._timeout_s))
        return self._client

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(translate(fn), *args, **kwargs)
        return await anyio.to_thread.run_sync(call, limiter=self._limiter)

    async def close(self) -> None:
        if self._client is not None:
            await anyio.to_thread.run_sync(self._client.close)
            self._client = None

    # -- daemon -------------------------------------------------------------------------

    async def version(self) -> dict[str, Any]:
        """The daemon's version document (also a reachability check)."""
        return await self._run(lambda: self.client.version())

    async def oci_runtimes(self) -> tuple[str, list[str]]:
        """Docker's default OCI runtime and every runtime registered with it."""
        info = await self._run(lambda: self.client.info())
        return str(info.get("DefaultRuntime", "runc")), sorted(info.get("Runtimes") or {})

    def _http(self) -> httpx.AsyncClient:
        """An async HTTP client of the Engine API, for streams a caller must be able to cut short."""
        url = urlparse(self._host)
        if url.scheme == "unix":
            return httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=url.path), base_url="http://docker", timeout=None
            )
        return httpx.AsyncClient(base_url=f"http://{url.hostname}:{url.port or 2375}", timeout=None)
