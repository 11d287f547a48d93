"""Running one command in a sandbox: streamed output, capped capture, a real kill at timeout.

Every command carries a random `DOCKYARD_EXEC_ID` in its environment; on timeout or cancel,
the in-image helper freezes and kills every process that inherited it (and every process in
their sessions), so a timed-out command does not keep running in the background.
"""

from __future__ import annotations

import codecs
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from dockyard.runtime.docker import STDERR, STDOUT, ContainerGoneError, DockerBackend
from dockyard.runtime.errors import BackendError
from dockyard.runtime.models import ExecResult

__all__ = ["OutputCallback", "run_command", "TIMEOUT_EXIT_CODE"]

log = logging.getLogger(__name__)

OutputCallback = Callable[[str, str], Awaitable[None]]
TIMEOUT_EXIT_CODE = 124
_FLUSH_EVERY_S = 0.1
_POLL_EVERY_S = 0.5
_KILL_RETRY_S = 15.0


@dataclass
class _Capture:
    """One stream's output, kept up to `cap` bytes; the rest is counted, not kept."""

    name: str
    cap: int
    kept: bytearray = field(default_factory=bytearray)
    dropped: int = 0

    def add(self, chunk: bytes) -> bytes:
        room = max(self.cap - len(self.kept), 0)
        keep = chunk[:room]
        self.kept += keep
        self.dropped += len(chunk) - len(keep)
        return keep

    def text(self) -> str:
        text = self.kept.decode("utf-8", errors="replace")
        if self.dropped:
            text += f"\n[... {self.dropped} more bytes of {self.name} truncated at the {self.cap}-byte cap]"
        return text


class _Streamer:
    """Coalesces output into at most one callback per stream every 100 ms."""

    def __init__(self, callback: OutputCallback | None) -> None:
        self._callback = callback
        self._decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")}
        self._pending = {"stdout": "", "stderr": ""}
        self._last = time.monotonic()

    async def add(self, name: str, data: bytes) -> None:
        if self._callback is None or not data:
            return
        self._pending[name] += self._decoders[name].decode(data)
        if time.monotonic() - self._last >= _FLUSH_EVERY_S:
            await self.flush()

    async def flush(self) -> None:
        if self._callback is None:
            return
        self._last = time.monotonic()
        for name, text in self._pending.items():
            if text:
                self._pending[name] = ""
                await self._callback(name, text)


async def run_command(
    docker: DockerBackend,
    container_id: str,
    argv: list[str],
    *,
    user: str,
    env: dict[str, str],
    workdir: str,
    stdin: bytes | None,
    timeout_s: float,
    cap_bytes: int,
    on_output: OutputCallback | None = None,
) -> ExecResult:
    """Run `argv` to completion or timeout and return what it printed (capped)."""
    token = secrets.token_hex(12)
    captures = {STDOUT: _Capture("stdout", cap_bytes), STDERR: _Capture("stderr", cap_bytes)}
    streamer = _Streamer(on_output)
    started = time.perf_counter()
    exit_code: int | None = None
    try:
        async with docker.exec_attached(
            container_id, argv, user=user, env={**env, "DOCKYARD_EXEC_ID": token}, workdir=workdir
        ) as channel:
            with anyio.move_on_after(timeout_s) as deadline:
                async with anyio.create_task_group() as tg:

                    async def watch() -> None:
                        # A command that leaves a background child holding stdout open has still
                        # ended: stop reading shortly after its own process exits.
                        nonlocal exit_code
                        while True:
                            await anyio.sleep(_POLL_EVERY_S)
                            info = await docker.exec_inspect(channel.exec_id)
                            if not info["Running"]:
                                exit_code = info["ExitCode"]
                                await anyio.sleep(0.2)
                                tg.cancel_scope.cancel()
                                return

                    tg.start_soon(channel.feed, stdin)
                    tg.start_soon(watch)
                    async for kind, chunk in channel.frames():
                        capture = captures.get(kind)
                        if capture is not None:
                            await streamer.add(capture.name, capture.add(chunk))
                    tg.cancel_scope.cancel()
            await streamer.flush()
            if deadline.cancelled_caught:
                await _kill(docker, container_id, user, token)
                exit_code = TIMEOUT_EXIT_CODE
            elif exit_code is None:
                exit_code = await channel.exit_code()
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _kill(docker, container_id, user, token)
        raise
    return ExecResult(
        exit_code=exit_code if exit_code is not None else TIMEOUT_EXIT_CODE,
        stdout=captures[STDOUT].text(),
        stderr=captures[STDERR].text(),
        timed_out=deadline.cancelled_caught,
        truncated=any(c.dropped for c in captures.values()),
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
    )


async def _kill(docker: DockerBackend, container_id: str, user: str, token: str) -> None:
    """Kill every process of one command; retries while the sandbox has no pid to spare."""
    with anyio.move_on_after(_KILL_RETRY_S):
        delay = 0.05
        while True:
            try:
                async with docker.exec_attached(container_id, ["dockyard-helper", "kill", token], user=user) as ch:
                    await ch.feed(None)
                    async for _ in ch.frames():
                        pass
                return
            except ContainerGoneError:
                return
            except BackendError as exc:
                log.debug("kill of exec %s failed, retrying: %s", token, exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 1.0)
    log.warning("could not kill the processes of exec %s in %s", token, container_id[:12])
