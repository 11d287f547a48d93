"""Running one command in a sandbox: streamed output, capped capture, a real kill at timeout.

The sandbox's supervisor runs the command as the sandbox user in a new session, below a reaper
of its own that every orphan of the command is re-parented to, and streams its output back
over the control link. On timeout, cancel or a lost connection it freezes and kills everything
below that reaper (however it detached: double forks, `setsid`, an emptied environment), so
nothing keeps running behind it. When the kernel killed processes for memory while the command
ran, its stderr ends with a note that says so.
"""

from __future__ import annotations

import codecs
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio

from dockyard.config.images.sandbox import protocol
from dockyard.runtime.runtimes.supervisor import Link
from dockyard.runtime.substrate.errors import InvalidRequestError, SupervisorError
from dockyard.runtime.substrate.models import ExecResult

__all__ = ["TIMEOUT_EXIT_CODE", "OutputCallback", "run_command"]

OutputCallback = Callable[[str, str], Awaitable[None]]
TIMEOUT_EXIT_CODE = 124
_STDIN_CHUNK = 1 << 20
# The supervisor enforces the timeout; the server gives up this much later if it never hears.
_LATE_S = 15.0


@dataclass
class _Capture:
    """One stream's output: its first and last bytes, `cap` in all; the middle is counted, not kept."""

    name: str
    cap: int
    head: bytearray = field(default_factory=bytearray)
    tail: bytearray = field(default_factory=bytearray)
    omitted: int = 0
    dropped: int = 0  # never read: past what the sandbox was asked to send

    def add(self, chunk: bytes) -> bytes:
        """Keep `chunk` as head or tail; returns the part that went to the head (the part streamed live)."""
        room = max(self.cap - self.cap // 2 - len(self.head), 0)
        live = chunk[:room]
        self.head += live
        self.tail += chunk[room:]
        if len(self.tail) > 2 * (self.cap // 2):  # trimmed now and then, not on every chunk
            self._trim()
        return live

    def _trim(self) -> None:
        over = len(self.tail) - self.cap // 2
        if over > 0:
            del self.tail[:over]
            self.omitted += over

    def text(self) -> str:
        """The kept output, with a marker where the middle was left out and a note of what was never read."""
        self._trim()
        tail = bytes(self.tail)
        if not self.omitted:
            text = (bytes(self.head) + tail).decode("utf-8", errors="replace")
        else:
            cut = 0
            while cut < min(3, len(tail)) and 0x80 <= tail[cut] < 0xC0:  # start the tail on a whole character
                cut += 1
            text = (
                bytes(self.head).decode("utf-8", errors="replace")
                + f"\n... {self.omitted + cut} bytes omitted (over the {self.cap}-byte output cap) ...\n"
                + tail[cut:].decode("utf-8", errors="replace")
            )
        if self.dropped:
            text += f"\n[... {self.dropped} more bytes of {self.name} were not read]"
        return text


class _Streamer:
    """Hands each chunk of output on as it arrives, decoded, in the order the streams wrote it
    (pacing them for a client is the caller's business)."""

    def __init__(self, callback: OutputCallback | None) -> None:
        self._callback = callback
        self._decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")}

    async def add(self, name: str, data: bytes) -> None:
        if self._callback is not None and data and (text := self._decoders[name].decode(data)):
            await self._callback(name, text)

    async def flush(self) -> None:
        """What is left of a character cut at the end of the output."""
        if self._callback is None:
            return
        for name, decoder in self._decoders.items():
            if text := decoder.decode(b"", final=True):
                await self._callback(name, text)


def _memory_note(ended: dict) -> str:
    """A visible note when the kernel killed processes of the sandbox for memory meanwhile."""
    kills = int(ended.get("oom_kills") or 0)
    if not kills:
        return ""
    limit = f" (its limit is {ended['memory_mb']} MiB)" if ended.get("memory_mb") else ""
    which = "1 process" if kills == 1 else f"{kills} processes"
    return (
        f"\n[dockyard: the sandbox ran out of memory{limit}; the kernel killed {which} "
        "while this command ran (exit code 137 means the command itself was one)]"
    )


async def run_command(
    link: Link,
    argv: list[str],
    *,
    env: dict[str, str],
    workdir: str,
    stdin: bytes | None,
    timeout_s: float,
    cap_bytes: int,
    scan_bytes: int | None = None,
    on_output: OutputCallback | None = None,
    user: str | None = None,
) -> ExecResult:
    """Run `argv` as the sandbox user (or `user`, another of the sandbox's users) to completion
    or timeout; returns its output, capped at `cap_bytes` per stream (head and tail), of the first
    `scan_bytes` the sandbox sends (default: `cap_bytes`)."""
    captures = {1: _Capture("stdout", cap_bytes), 2: _Capture("stderr", cap_bytes)}
    streamer = _Streamer(on_output)
    started = time.perf_counter()
    request = {
        "t": protocol.EXEC,
        "argv": argv,
        "env": env,
        "cwd": workdir,
        "timeout_s": timeout_s,
        "cap_bytes": max(scan_bytes or cap_bytes, cap_bytes),
        "token": secrets.token_hex(12),
        "stdin": stdin is not None,
    }
    if user is not None:
        request["user"] = user
    ended: dict | None = None
    async with link.request(request) as (request_id, frames):
        try:
            with anyio.move_on_after(timeout_s + _LATE_S):
                if stdin is not None:
                    for at in range(0, len(stdin), _STDIN_CHUNK):
                        await link.send({"t": protocol.STDIN, "id": request_id}, stdin[at : at + _STDIN_CHUNK])
                    await link.send({"t": protocol.STDIN, "id": request_id})
                async for frame in frames:
                    if frame.kind == protocol.OUT:
                        capture = captures[2 if frame.obj.get("fd") == 2 else 1]
                        await streamer.add(capture.name, capture.add(frame.body))
                    elif frame.kind == protocol.EXIT:
                        ended = frame.obj
                        break
        finally:
            if ended is None and not link.closed:
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    try:
                        await link.send({"t": protocol.KILL, "id": request_id})
                    except SupervisorError:
                        pass
    await streamer.flush()
    if ended is None:
        if link.closed:
            raise SupervisorError("the sandbox's supervisor went away while the command ran")
        raise SupervisorError(f"the sandbox did not report the command's end within {timeout_s + _LATE_S:g} s")
    if ended.get("refused") == "user":
        raise SupervisorError(
            f"{ended['error']} (its users are agent and m1..m16; an image built before they existed needs a rebuild)"
        )
    if ended.get("refused") == "cwd":
        raise InvalidRequestError(f"{ended['error']}; give a directory under /workspace that exists")
    if ended.get("error"):
        raise SupervisorError(str(ended["error"]))
    for capture, dropped_there in zip(captures.values(), ended.get("dropped") or [0, 0], strict=False):
        capture.dropped += int(dropped_there)  # cut in the sandbox, never sent
    timed_out = bool(ended.get("timed_out"))
    code = ended.get("code")
    return ExecResult(
        exit_code=TIMEOUT_EXIT_CODE if timed_out else (-1 if code is None else int(code)),
        stdout=captures[1].text(),
        stderr=captures[2].text() + _memory_note(ended),
        timed_out=timed_out,
        truncated=any(c.dropped or c.omitted for c in captures.values()),
        duration_ms=round((time.perf_counter() - started) * 1000, 3),
    )
