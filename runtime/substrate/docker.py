"""The Docker backend: the only module that talks to the Docker daemon.

docker-py is blocking, so every call hops to a worker thread. Attached execs (stdin, streamed
stdout/stderr) use the Engine API's hijacked connection directly over an async socket, so a
long-running command holds no thread and can be abandoned the moment it times out.
docker-py errors are translated into the engine's error tree here and nowhere else.
"""

from __future__ import annotations

import functools
import json
import struct
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar, cast
from urllib.parse import urlparse

import anyio
import anyio.abc
import docker
import docker.errors
import httpx
import requests.exceptions

from dockyard.runtime.substrate.errors import (
    BackendError,
    ContainerGoneError,
    DockerUnavailableError,
    SizeLimitError,
    TimeLimitError,
)

__all__ = ["STDERR", "STDOUT", "ContainerSpec", "DockerBackend", "ExecChannel"]

T = TypeVar("T")
STDOUT = 1
STDERR = 2
_FRAME_HEADER = struct.Struct(">BxxxL")


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


_UNREACHABLE = (
    "the Docker daemon is not reachable; start it (e.g. `sudo systemctl start docker`) and check `dockyard doctor`"
)


@contextmanager
def _docker_errors() -> Iterator[None]:
    """Map docker-py's errors onto the engine's error tree."""
    try:
        yield
    except docker.errors.NotFound as exc:
        raise ContainerGoneError(f"docker: {exc.explanation or exc}") from exc
    except docker.errors.APIError as exc:
        raise BackendError(f"docker: {exc.explanation or exc}") from exc
    except (requests.exceptions.ConnectionError, docker.errors.DockerException) as exc:
        raise DockerUnavailableError(_UNREACHABLE) from exc


def _translate(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with _docker_errors():
            return fn(*args, **kwargs)

    return wrapper


class ExecChannel:
    """One attached exec: write stdin, read (stream, bytes) frames."""

    def __init__(self, backend: DockerBackend, exec_id: str, stream: anyio.abc.ByteStream, pending: bytes) -> None:
        self.exec_id = exec_id
        self._backend = backend
        self._stream = stream
        self._buffer = bytearray(pending)

    async def send(self, data: bytes) -> None:
        """Write to the process's stdin."""
        await self._stream.send(data)

    async def close_stdin(self) -> None:
        """Half-close: the process reads end-of-file on stdin (a no-op once the exec has ended)."""
        try:
            await self._stream.send_eof()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass

    async def frames(self) -> AsyncIterator[tuple[int, bytes]]:
        """Yield (STDOUT|STDERR, chunk) until the process's output ends."""
        while True:
            while len(self._buffer) < _FRAME_HEADER.size:
                if not await self._fill():
                    return
            kind, size = _FRAME_HEADER.unpack_from(self._buffer)
            while len(self._buffer) < _FRAME_HEADER.size + size:
                if not await self._fill():
                    return
            chunk = bytes(self._buffer[_FRAME_HEADER.size : _FRAME_HEADER.size + size])
            del self._buffer[: _FRAME_HEADER.size + size]
            yield kind, chunk

    async def _fill(self) -> bool:
        try:
            data = await self._stream.receive(65536)
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        self._buffer += data
        return True

    async def aclose(self) -> None:
        """Drop the connection; the process is not killed by this."""
        await self._stream.aclose()


class DockerBackend:
    """Blocking docker-py calls off the event loop, plus async attached execs."""

    def __init__(self, docker_host: str, timeout_s: float) -> None:
        self._host = docker_host
        self._timeout_s = timeout_s
        self._client: docker.DockerClient | None = None
        # Exec and archive calls are many and short; give them room beyond anyio's default pool.
        self._limiter = anyio.CapacityLimiter(64)
        self._pausing: set[str] = set()  # containers this process paused (for a snapshot)
        self._paused_outside: set[str] = set()  # containers seen paused by someone else

    @property
    def client(self) -> docker.DockerClient:
        if self._client is None:
            self._client = _translate(docker.DockerClient)(base_url=self._host, timeout=int(self._timeout_s))
        return self._client

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(_translate(fn), *args, **kwargs)
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

    # -- containers ---------------------------------------------------------------------

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
            raise DockerUnavailableError(_UNREACHABLE) from exc

    def _http(self) -> httpx.AsyncClient:
        """An async HTTP client of the Engine API, for streams a caller must be able to cut short."""
        url = urlparse(self._host)
        if url.scheme == "unix":
            return httpx.AsyncClient(
                transport=httpx.AsyncHTTPTransport(uds=url.path), base_url="http://docker", timeout=None
            )
        return httpx.AsyncClient(base_url=f"http://{url.hostname}:{url.port or 2375}", timeout=None)

    async def list_containers(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        """Every container (running or not) carrying all of these labels."""
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        return await self._run(self.client.api.containers, all=True, filters=filters)

    # -- exec ---------------------------------------------------------------------------

    @asynccontextmanager
    async def exec_attached(
        self,
        container_id: str,
        argv: list[str],
        *,
        user: str,
        env: dict[str, str] | None = None,
        workdir: str | None = None,
    ) -> AsyncIterator[ExecChannel]:
        """Start `argv` in the container with stdin, stdout and stderr attached."""
        exec_id = (
            await self._run(
                self.client.api.exec_create,
                container_id,
                argv,
                stdin=True,
                user=user,
                environment=env or {},
                workdir=workdir,
            )
        )["Id"]
        stream, pending = await self._hijack(f"/exec/{exec_id}/start", {"Detach": False, "Tty": False})
        channel = ExecChannel(self, exec_id, stream, pending)
        try:
            yield channel
        finally:
            with anyio.CancelScope(shield=True):
                await channel.aclose()

    async def _hijack(self, path: str, body: dict[str, Any]) -> tuple[anyio.abc.ByteStream, bytes]:
        """POST to the Engine API and take over the connection as a raw stream."""
        url = urlparse(self._host)
        try:
            if url.scheme == "unix":
                stream: anyio.abc.ByteStream = await anyio.connect_unix(url.path)
            elif url.scheme in ("tcp", "http"):
                stream = await anyio.connect_tcp(url.hostname or "127.0.0.1", url.port or 2375)
            else:
                raise BackendError(f"attached exec supports unix:// and tcp:// docker hosts, not {self._host}")
        except OSError as exc:
            raise DockerUnavailableError(_UNREACHABLE) from exc
        payload = json.dumps(body).encode()
        version = self.client.api.api_version
        request = (
            f"POST /v{version}{path} HTTP/1.1\r\nHost: docker\r\nContent-Type: application/json\r\n"
            f"Connection: Upgrade\r\nUpgrade: tcp\r\nContent-Length: {len(payload)}\r\n\r\n"
        ).encode() + payload
        try:
            await stream.send(request)
            head = bytearray()
            while b"\r\n\r\n" not in head:
                head += await stream.receive(65536)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            raise
        header, _, rest = bytes(head).partition(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        if status not in (101, 200):
            await stream.aclose()
            message = rest.decode(errors="replace").strip()
            if status == 404:
                raise ContainerGoneError(f"docker: {message}")
            raise BackendError(f"docker: exec failed ({status}): {message}")
        return stream, rest

    # -- archives -----------------------------------------------------------------------

    async def put_archive(self, container_id: str, path: str, data: bytes | IO[bytes]) -> None:
        """Extract a tar archive at `path` inside the container."""
        await self._run(self.client.api.put_archive, container_id, path, data)

    async def get_archive_to(
        self, container_id: str, path: str, sink: IO[bytes], *, limit: int | None = None, deadline: float | None = None
    ) -> int:
        """Stream a tar of `path` inside the container into `sink`; returns bytes written.

        Stops with a SizeLimitError past `limit` bytes, or a TimeLimitError past `deadline`
        (a `time.monotonic()` value), holding one chunk in memory at a time. Stopping closes the
        connection, so the daemon ends the copy at once and the container is free again."""
        version = await self._run(lambda: self.client.api.api_version)
        written = 0
        try:
            with anyio.fail_after(None if deadline is None else max(0.0, deadline - time.monotonic())):
                async with (
                    self._http() as http,
                    http.stream(
                        "GET",
                        f"/v{version}/containers/{container_id}/archive",
                        params={"path": path},
                        headers={"Accept-Encoding": "identity"},  # a plain tar, as it is restored
                    ) as response,
                ):
                    if response.status_code != 200:
                        message = (await response.aread()).decode(errors="replace").strip()
                        if response.status_code == 404:
                            raise ContainerGoneError(f"docker: {message}")
                        raise BackendError(
                            f"docker: the archive of {path} was refused ({response.status_code}): {message}"
                        )
                    async for chunk in response.aiter_raw(1 << 20):
                        written += len(chunk)
                        if limit is not None and written > limit:
                            raise SizeLimitError(f"the archive of {path} is over {limit} bytes")
                        await anyio.to_thread.run_sync(sink.write, chunk)
        except TimeoutError:
            raise TimeLimitError(f"the archive of {path} took too long") from None
        except httpx.TransportError as exc:
            raise DockerUnavailableError(_UNREACHABLE) from exc
        return written

    # -- networks -----------------------------------------------------------------------

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

    # -- images -------------------------------------------------------------------------

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

    async def export_paths(self, image: str, paths: list[str], target: Path, labels: dict[str, str]) -> None:
        """Write one tar of `paths` as the image has them (owners and modes included) to
        `target`, from a container that is created and removed without ever starting."""

        def export() -> None:
            api = self.client.api
            container_id = api.create_container(image, command=["true"], labels=labels, network_disabled=True)["Id"]
            partial = target.with_suffix(".partial")
            try:
                with tarfile.open(partial, "w") as out:
                    for path in paths:
                        chunks, _stat = api.get_archive(container_id, path)
                        with tempfile.TemporaryFile() as raw:
                            for chunk in chunks:
                                raw.write(chunk)
                            raw.seek(0)
                            with tarfile.open(fileobj=raw) as part:
                                for member in part.getmembers():
                                    out.addfile(member, part.extractfile(member) if member.isfile() else None)
                partial.replace(target)
            finally:
                partial.unlink(missing_ok=True)
                api.remove_container(container_id, force=True, v=True)

        await self._run(export)

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
        with _docker_errors():
            yield from self.client.api.build(
                path=context, tag=tag, labels=labels, buildargs=buildargs, rm=True, forcerm=True, decode=True
            )
