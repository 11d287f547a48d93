"""Running a dispatch's work on the machine dockyard runs on (dispatch mode `user_pc`).

Only reached once config enables the mode and the user confirmed the run. The program runs
as the server's user, in its own session so that a timeout or a cancel kills it and
everything it started; its output is capped like a sandbox's.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream, Process

__all__ = ["HostRun", "run_on_host"]

# What a host run inherits from the server's own environment; everything else is left out
# (the server's environment may hold keys that the run has no business seeing).
_INHERITED = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TERM", "TZ")
_LINGER_S = 0.2


@dataclass
class HostRun:
    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool


async def run_on_host(argv: list[str], *, cwd: Path, env: dict[str, str], timeout_s: float, cap: int) -> HostRun:
    """Run `argv` in `cwd` with the inherited basics plus `env`. On timeout or cancel its whole
    session is killed; a run that exits by itself keeps its background children, as in a
    sandbox. Each stream keeps its last `cap` bytes."""
    environment = {key: os.environ[key] for key in _INHERITED if key in os.environ} | env
    process = await anyio.open_process(
        argv, cwd=cwd, env=environment, stdin=None, start_new_session=True
    )
    outputs: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    finished = False
    try:
        with anyio.move_on_after(timeout_s):
            async with anyio.create_task_group() as tg:
                assert process.stdout is not None and process.stderr is not None
                drained = [anyio.Event(), anyio.Event()]
                tg.start_soon(_drain, process.stdout, outputs["stdout"], cap, drained[0])
                tg.start_soon(_drain, process.stderr, outputs["stderr"], cap, drained[1])
                await process.wait()
                finished = True
                # A background child may hold the pipes open: it may go on, unread.
                with anyio.move_on_after(_LINGER_S):
                    for event in drained:
                        await event.wait()
                tg.cancel_scope.cancel()
    finally:
        if not finished:  # timed out or cancelled: the run and all it started go
            with anyio.CancelScope(shield=True):
                await _kill_session(process)
    return HostRun(
        exit_code=process.returncode if finished and process.returncode is not None else 124,
        stdout=outputs["stdout"].decode(errors="replace"),
        stderr=outputs["stderr"].decode(errors="replace"),
        timed_out=not finished,
    )


async def _drain(stream: ByteReceiveStream, into: bytearray, cap: int, done: anyio.Event) -> None:
    async for chunk in stream:
        into.extend(chunk)
        if len(into) > cap:
            del into[: len(into) - cap]
    done.set()


async def _kill_session(process: Process) -> None:
    """Kill the run's session (it leads it), then reap the run."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    await process.wait()
