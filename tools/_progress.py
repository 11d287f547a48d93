"""Live progress for a running tool call: output as it comes, status changes, and heartbeats.

What a client sees in `notifications/progress` (`progress` counts the call's notifications,
1, 2, 3, ...: it strictly increases; `total` is never set):

- output: the text as the program wrote it, stdout and stderr in the order they arrived; each
  line of stderr starts with `[stderr] `. One notification holds what arrived since the last
  (at most `MESSAGE_CAP` characters: its head and tail, with what was left out named between; the result has it all).
- a status change: `[dockyard] ` and a sentence (`[dockyard] dispatch dsp_... is completed`,
  `[dockyard] building image 'sandbox' (12 s): step 3/9: ...`).
- a heartbeat, when the call has sent nothing for `heartbeat_s`:
  `[dockyard] running for 15 s; last output: <its last TAIL_CHARS characters>` (or
  `; no output yet`).

Pacing: a notification goes out as soon as there is something to send, but at most one every
`MIN_GAP_S` (50 ms); what arrives meanwhile goes out together at the end of that gap. So a
chunk waits at most 50 ms and a flood makes at most 20 notifications a second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio

from dockyard.runtime.runtimes.images import BuildState
from dockyard.tools._context import EngineContext, engine

__all__ = ["MESSAGE_CAP", "MIN_GAP_S", "TAIL_CHARS", "Progress", "build_notes", "live"]

log = logging.getLogger(__name__)

MIN_GAP_S = 0.05
MESSAGE_CAP = 16 * 1024
TAIL_CHARS = 300
STDERR = "[stderr] "
NOTE = "[dockyard] "

Send = Callable[[float, str], Awaitable[None]]


class Progress:
    """The progress notifications of one call; `pacing()` runs them while the call does its work."""

    def __init__(self, send: Send, heartbeat_s: float) -> None:
        self._send = send
        self._heartbeat_s = heartbeat_s
        self._queue: list[tuple[bool, str]] = []  # (is output, text), in order
        self._wake = anyio.Event()
        self._started = self._last = time.monotonic()  # _last: the latest notification (or the start)
        self._gap_from = self._started - MIN_GAP_S  # the first output goes out at once
        self._sent = 0
        self._tail = ""
        self._line_start = True  # of the output as shown, for the stderr labels
        self._last_stream = "stdout"
        self._gone = False

    @property
    def sent(self) -> int:
        """How many notifications went out."""
        return self._sent

    async def output(self, stream: str, text: str) -> None:
        """Output of the running program (`stream`: stdout or stderr); sent within 50 ms."""
        if not text:
            return
        shown = self._label(text) if stream == "stderr" else text
        self._last_stream = stream
        self._line_start = shown.endswith("\n")
        self._tail = (self._tail + shown)[-TAIL_CHARS:]
        if self._queue and self._queue[-1][0]:
            self._queue[-1] = (True, self._queue[-1][1] + shown)
        else:
            self._queue.append((True, shown))
        self._wake.set()

    async def note(self, text: str) -> None:
        """A status change, sent after the output before it."""
        self._queue.append((False, NOTE + text))
        self._wake.set()

    def _label(self, text: str) -> str:
        """Stderr text with `[stderr] ` at the start of each of its lines."""
        shown = []
        fresh = self._line_start or self._last_stream != "stderr"
        for line in text.splitlines(keepends=True):
            shown.append(STDERR + line if fresh else line)
            fresh = line.endswith("\n")
        return "".join(shown)

    @asynccontextmanager
    async def pacing(self) -> AsyncIterator[Progress]:
        """Send notifications while the body runs; what is left is sent when it ends (also
        when it raises, so output before an error is not lost; not when it is cancelled)."""
        failure: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._pace)
            try:
                yield self
            except Exception as exc:  # noqa: BLE001 - re-raised unchanged below, outside the task group (not as a group)
                failure = exc
            finally:
                tg.cancel_scope.cancel()
        await self._flush()
        if failure is not None:
            raise failure

    async def _pace(self) -> None:
        while True:
            due = self._gap_from + MIN_GAP_S if self._queue else self._last + self._heartbeat_s
            wait = due - time.monotonic()
            if wait > 0:
                with anyio.move_on_after(wait):
                    await self._wake.wait()
                self._wake = anyio.Event()
                continue
            if self._queue:
                await self._flush()
            else:
                await self._beat()

    async def _flush(self) -> None:
        queue, self._queue = self._queue, []
        for is_output, text in queue:
            if is_output and len(text) > MESSAGE_CAP:
                # Head and tail: the end of a batch (an error, the last line) matters most.
                cut, half = len(text) - MESSAGE_CAP, MESSAGE_CAP // 2
                note = f"\n{NOTE}{cut} more characters not streamed; the result has them\n"
                text = text[:half] + note + text[-half:]
            await self._emit(text)

    async def _beat(self) -> None:
        elapsed = time.monotonic() - self._started
        said = f"; last output: {self._tail}" if self._tail else "; no output yet"
        await self._emit(f"{NOTE}running for {elapsed:.0f} s{said}")

    async def _emit(self, message: str) -> None:
        self._last = self._gap_from = time.monotonic()
        if self._gone:
            return
        self._sent += 1
        try:
            await self._send(self._sent, message)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            self._gone = True  # the client went away; the call itself goes on
            log.debug("progress notifications stop: %r", exc)


@asynccontextmanager
async def live(ctx: EngineContext) -> AsyncIterator[Progress]:
    """This call's progress: output and notes sent as they come, heartbeats while it is quiet."""

    async def send(progress: float, message: str) -> None:
        await ctx.report_progress(progress, None, message)

    async with Progress(send, engine(ctx).settings.progress.heartbeat_s).pacing() as progress:
        yield progress


def build_notes(progress: Progress) -> Callable[[BuildState], Awaitable[None]]:
    """A callback that reports an image build as status notes."""

    async def notify(state: BuildState) -> None:
        elapsed = time.monotonic() - state.started
        await progress.note(f"building image '{state.recipe}' ({elapsed:.0f} s): {state.describe()}")

    return notify
