"""Execs and archives: attached execs over the Engine API's hijacked connection, and tar
archives copied into and out of containers and images.

An attached exec (stdin, streamed stdout/stderr) holds no thread: it runs over an async socket,
so a long-running command can be abandoned the moment it times out. An archive is streamed one
chunk at a time, with a size limit and a deadline.
"""

from __future__ import annotations

import json
import struct
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import anyio
import anyio.abc
import httpx

from dockyard.runtime.substrate.dockerapi import UNREACHABLE, DockerConnection
from dockyard.runtime.substrate.errors import (
    BackendError,
    ContainerGoneError,
    DockerUnavailableError,
    SizeLimitError,
    TimeLimitError,
)

__all__ = ["STDERR", "STDOUT", "ExecCalls", "ExecChannel"]

STDOUT = 1
STDERR = 2
_FRAME_HEADER = struct.Struct(">BxxxL")


class ExecChannel:
    """One attached exec: write stdin, read (stream, bytes) frames."""

    def __init__(self, backend: DockerConnection, exec_id: str, stream: anyio.abc.ByteStream, pending: bytes) -> None:
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


class ExecCalls(DockerConnection):
    """Attached execs and archives."""

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
            raise DockerUnavailableError(UNREACHABLE) from exc
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
            raise DockerUnavailableError(UNREACHABLE) from exc
        return written

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
