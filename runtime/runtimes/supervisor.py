"""The server's end of each sandbox's control channel to its in-sandbox supervisor.

Every sandbox container runs a supervisor (config/images/sandbox/supervisor.py, where the
protocol is documented) listening on a unix socket in a directory the server bind-mounts from
`<data dir>/control/<runtime id>`. The frame format, limits, kinds and proofs are defined once,
in `dockyard.config.images.sandbox.protocol`, which the supervisor imports too. A `Link` is one authenticated connection to it; requests
are multiplexed on it by id, so commands, file operations and bridge sessions share it.
`Supervisors` keeps one link per container, connecting (again) when one is needed.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from dockyard.config.images.sandbox import protocol
from dockyard.runtime.substrate.docker import DockerBackend
from dockyard.runtime.substrate.errors import DockyardError, SupervisorError

__all__ = ["CONTROL_MOUNT", "PROTOCOL", "BridgeHandler", "Frame", "Link", "Supervisors", "connect_unix"]

log = logging.getLogger(__name__)

PROTOCOL = protocol.VERSION
CONTROL_MOUNT = protocol.CONTROL_DIR
_CALL_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Frame:
    """One message of the protocol: its JSON object and its binary body."""

    obj: dict[str, Any]
    body: bytes = b""

    @property
    def kind(self) -> str:
        return str(self.obj.get("t", ""))


class BridgeSession:
    """Bytes a process inside a sandbox sent through dockyard-bridge, and the way back."""

    def __init__(self, link: Link, bid: int, user: str | None = None) -> None:
        self._link = link
        self.bid = bid
        self.runtime_id = link.runtime_id
        self.user = user  # the sandbox user the bridge's process runs as (SO_PEERCRED); None if unknown
        self._send, self.incoming = anyio.create_memory_object_stream[bytes](64)

    async def send(self, data: bytes) -> None:
        """Bytes to the process in the sandbox."""
        await self._link.send({"t": protocol.BRIDGE_DATA, "bid": self.bid}, data)

    async def arrived(self, data: bytes) -> bool:
        """Bytes from the process; False once nobody reads them any more."""
        try:
            await self._send.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return False
        return True

    def ended(self) -> None:
        """The process closed its end (or the link went): `incoming` ends."""
        self._send.close()

    async def close(self) -> None:
        self._send.close()
        try:
            await self._link.send({"t": protocol.BRIDGE_CLOSE, "bid": self.bid})
        except SupervisorError:
            pass


# Serves one bridge session until its incoming bytes end.
BridgeHandler = Callable[[BridgeSession], Awaitable[None]]


class Link:
    """One authenticated connection to a sandbox's supervisor."""

    def __init__(self, stream: anyio.abc.ByteStream, runtime_id: str, container_id: str) -> None:
        self._stream = stream
        self._reader = BufferedByteReceiveStream(stream)
        self._write_lock = anyio.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, MemoryObjectSendStream[Frame]] = {}
        self._bridges: dict[int, BridgeSession] = {}
        self.runtime_id = runtime_id
        self.container_id = container_id
        self.closed = False
        self.supervisor_pid: int | None = None

    # -- framing ---------------------------------------------------------------------

    async def send(self, obj: dict[str, Any], body: bytes = b"") -> None:
        try:
            frame = protocol.encode(obj, body)
        except protocol.FrameError as exc:  # refused before a byte is sent: the link stays up
            raise SupervisorError(f"'{obj.get('t')}' cannot be sent to the sandbox's supervisor: {exc}") from exc
        try:
            async with self._write_lock:
                await self._stream.send(frame)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            self.closed = True
            raise SupervisorError(f"the sandbox's supervisor connection broke: {exc}") from exc

    async def _receive(self) -> Frame:
        try:
            size, body_size = protocol.sizes(await self._reader.receive_exactly(protocol.HEADER.size))
            obj = protocol.parse(await self._reader.receive_exactly(size))
        except protocol.FrameError as exc:
            raise SupervisorError(f"the supervisor broke the protocol: {exc}") from exc
        body = await self._reader.receive_exactly(body_size) if body_size else b""
        return Frame(obj, body)

    # -- handshake -------------------------------------------------------------------

    async def handshake(self, key: bytes) -> None:
        """Prove we hold the key, and check that the supervisor does too."""
        with anyio.fail_after(protocol.HANDSHAKE_TIMEOUT_S):
            hello = await self._receive()
            if hello.kind != protocol.HELLO or hello.obj.get("protocol") != PROTOCOL:
                raise SupervisorError(f"the supervisor speaks {hello.obj!r}, not protocol {PROTOCOL}")
            nonce = secrets.token_hex(16)
            proof = protocol.proof(key, "server", str(hello.obj.get("nonce")))
            await self.send({"t": protocol.AUTH, "protocol": PROTOCOL, "nonce": nonce, "proof": proof})
            ready = await self._receive()
        if ready.kind != protocol.READY:
            raise SupervisorError(f"the supervisor refused the connection: {ready.obj.get('message', ready.obj)}")
        if not hmac.compare_digest(str(ready.obj.get("proof", "")), protocol.proof(key, "supervisor", nonce)):
            raise SupervisorError("the process on the control socket could not prove it holds the sandbox's key")
        self.supervisor_pid = ready.obj.get("pid")

    # -- serving ---------------------------------------------------------------------

    async def serve(self, on_bridge: BridgeHandler | None, tg: anyio.abc.TaskGroup) -> None:
        """Route incoming frames until the connection ends; then every waiter sees the end."""
        try:
            while True:
                frame = await self._receive()
                if frame.kind in protocol.BRIDGE:
                    await self._bridge_frame(frame, on_bridge, tg)
                    continue
                waiter = self._waiting.get(frame.obj.get("id", -1))
                if waiter is not None:
                    try:
                        await waiter.send(frame)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        self._waiting.pop(frame.obj["id"], None)
        except (
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            OSError,
            ValueError,
            DockyardError,
        ) as exc:
            log.debug("control link to %s ended: %r", self.container_id[:12], exc)
        finally:
            self.closed = True
            for waiter in self._waiting.values():
                waiter.close()
            self._waiting.clear()
            for session in self._bridges.values():
                session.ended()
            self._bridges.clear()
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()

    async def aclose(self) -> None:
        """Close the connection; `serve` then ends and every waiter sees the end."""
        self.closed = True
        await self._stream.aclose()

    async def _bridge_frame(self, frame: Frame, on_bridge: BridgeHandler | None, tg: anyio.abc.TaskGroup) -> None:
        bid = int(frame.obj.get("bid", 0))
        if frame.kind == protocol.BRIDGE_OPEN:
            if on_bridge is None:
                await self.send({"t": protocol.BRIDGE_CLOSE, "bid": bid})
                return
            user = frame.obj.get("user")
            session = self._bridges[bid] = BridgeSession(self, bid, user if isinstance(user, str) else None)

            async def run() -> None:
                try:
                    await on_bridge(session)
                finally:
                    self._bridges.pop(bid, None)
                    with anyio.CancelScope(shield=True):
                        await session.close()

            tg.start_soon(run)
        elif (known := self._bridges.get(bid)) is not None:
            if frame.kind == protocol.BRIDGE_DATA:
                if not await known.arrived(frame.body):
                    self._bridges.pop(bid, None)
            elif frame.kind == protocol.BRIDGE_CLOSE:
                known.ended()
                self._bridges.pop(bid, None)

    # -- requests --------------------------------------------------------------------

    @asynccontextmanager
    async def request(
        self, obj: dict[str, Any], body: bytes = b""
    ) -> AsyncIterator[tuple[int, MemoryObjectReceiveStream[Frame]]]:
        """Send a request; yields its id and the stream of frames answering it."""
        if self.closed:
            raise SupervisorError("the sandbox's supervisor connection is closed")
        request_id = next(self._ids)
        send, receive = anyio.create_memory_object_stream[Frame](256)
        self._waiting[request_id] = send
        try:
            await self.send({**obj, "id": request_id}, body)
            with receive:
                yield request_id, receive
        finally:
            self._waiting.pop(request_id, None)
            send.close()

    async def call(self, obj: dict[str, Any], body: bytes = b"", timeout_s: float = _CALL_TIMEOUT_S) -> Frame:
        """A request answered by one `result` frame."""
        async with self.request(obj, body) as (_, frames):
            with anyio.move_on_after(timeout_s) as scope:
                async for frame in frames:
                    if frame.kind == protocol.RESULT:
                        return frame
            if scope.cancelled_caught:
                raise SupervisorError(
                    f"the sandbox's supervisor did not answer '{obj.get('t')}' within {timeout_s:g} s"
                )
        raise SupervisorError(f"the sandbox's supervisor went away during '{obj.get('t')}'")


class Supervisors:
    """One control link per sandbox container, and the host directories behind them."""

    def __init__(self, root: Path, docker: DockerBackend) -> None:
        self._root = root
        self._docker = docker
        self._links: dict[str, Link] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._runtime_of: dict[str, str] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self.on_bridge: BridgeHandler | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Hold the links' reader tasks; ends (closing every link) when cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            await anyio.sleep_forever()

    # -- host directories ------------------------------------------------------------

    def directory(self, runtime_id: str) -> Path:
        return self._root / runtime_id

    def prepare(self, runtime_id: str) -> Path:
        """Create the runtime's control directory with a fresh key; returns it (to bind-mount).

        Inside the container it is reachable by root alone (its parent there is mode 0700);
        here only by this server's user. When the server does not run as root, the supervisor
        (root without DAC capabilities) needs write and search on it to create its socket.
        """
        self._root.mkdir(parents=True, exist_ok=True)
        self._root.chmod(0o700)
        path = self.directory(runtime_id)
        path.mkdir(exist_ok=True)
        path.chmod(0o700 if os.geteuid() == 0 else 0o733)
        self.rotate_key(runtime_id)
        return path

    def rotate_key(self, runtime_id: str) -> None:
        """A new key for the runtime's next connections (the current link stays)."""
        path = self.directory(runtime_id) / protocol.KEY
        staging = path.with_suffix(".new")
        staging.write_bytes(secrets.token_hex(32).encode())
        staging.chmod(0o600 if os.geteuid() == 0 else 0o644)
        staging.replace(path)

    async def discard(self, runtime_id: str, container_id: str | None) -> None:
        """Forget a runtime whose container is gone: close its link, remove its directory."""
        if container_id:
            self._runtime_of.pop(container_id, None)
            self._locks.pop(container_id, None)
            link = self._links.pop(container_id, None)
            if link is not None:
                await link.aclose()
        shutil.rmtree(self.directory(runtime_id), ignore_errors=True)

    def sweep(self, keep: set[str]) -> None:
        """Remove the control directories of runtimes that are no longer live."""
        if self._root.is_dir():
            for path in self._root.iterdir():
                if path.name not in keep:
                    shutil.rmtree(path, ignore_errors=True)

    # -- links -----------------------------------------------------------------------

    async def attach(self, runtime_id: str, container_id: str, timeout_s: float) -> Link:
        """Wait for a just-started container's supervisor and connect to it."""
        self._runtime_of[container_id] = runtime_id
        with anyio.move_on_after(timeout_s):
            delay = 0.005
            while not (self.directory(runtime_id) / protocol.SOCKET).exists():
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.1)
        return await self.link(container_id)

    async def link(self, container_id: str) -> Link:
        """The container's live link, connecting when there is none (after a restart, say)."""
        link = self._links.get(container_id)
        if link is not None and not link.closed:
            return link
        lock = self._locks.setdefault(container_id, anyio.Lock())
        async with lock:
            link = self._links.get(container_id)
            if link is not None and not link.closed:
                return link
            link = await self._connect(container_id)
            self._links[container_id] = link
            return link

    async def call(
        self, container_id: str, obj: dict[str, Any], body: bytes = b"", timeout_s: float = _CALL_TIMEOUT_S
    ) -> Frame:
        link = await self.link(container_id)
        return await link.call(obj, body, timeout_s)

    async def _connect(self, container_id: str) -> Link:
        if self._tg is None:
            raise SupervisorError("the supervisor links are not running")
        runtime_id = self._runtime_of.get(container_id) or await self._runtime_id(container_id)
        directory = self.directory(runtime_id)
        try:
            key = (directory / protocol.KEY).read_bytes().strip()
        except OSError as exc:
            raise SupervisorError(f"runtime {runtime_id} has no control key: {exc.strerror}") from exc
        try:
            stream = await connect_unix(directory / protocol.SOCKET)
        except OSError as exc:
            raise SupervisorError(f"the sandbox's supervisor is not listening: {exc.strerror}") from exc
        link = Link(stream, runtime_id, container_id)
        try:
            await link.handshake(key)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            if isinstance(exc, (TimeoutError, anyio.EndOfStream, anyio.IncompleteRead, OSError, ValueError)):
                raise SupervisorError(f"the handshake with the sandbox's supervisor failed: {exc!r}") from exc
            raise
        self._runtime_of[container_id] = runtime_id
        self._tg.start_soon(link.serve, self._bridge, self._tg)
        return link

    async def _bridge(self, session: BridgeSession) -> None:
        if self.on_bridge is not None:
            await self.on_bridge(session)

    async def _runtime_id(self, container_id: str) -> str:
        labels = await self._docker.container_labels(container_id)
        runtime_id = (labels or {}).get("dockyard.runtime")
        if not runtime_id:
            raise SupervisorError(f"container {container_id[:12]} is not a dockyard runtime")
        return runtime_id


async def connect_unix(path: Path) -> anyio.abc.SocketStream:
    """Connect to a unix socket, also one whose path is longer than the kernel's 108 bytes."""
    if len(os.fsencode(path)) < 100:
        return await anyio.connect_unix(path)
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        return await anyio.connect_unix(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)
