"""The host runner: a job's work on the machine dockyard runs on (dispatch mode `user_pc`).

Only reached once config enables the mode and the user confirmed the run. The program (a
`script` run by bash, or a `command` profile's argv) runs as the server's user, in its own
session so that a timeout or a cancel kills it and everything it started; its output is
capped like a sandbox's.
"""

from __future__ import annotations

import codecs
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import ByteReceiveStream, Process

from dockyard.runtime.substrate.errors import InvalidRequestError
from dockyard.runtime.work.runners.base import Job, OnHost, OutputCallback, RunResult, command_argv

__all__ = ["HostRun", "HostRunner", "run_on_host"]

# What a host run inherits from the server's own environment; everything else is left out
# (the server's environment may hold keys that the run has no business seeing).
_INHERITED = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TERM", "TZ")
_LINGER_S = 0.2


class HostRunner:
    """Runs `script` and `command` jobs on this machine, outside any sandbox."""

    def __init__(self, cap: int) -> None:
        self._cap = cap

    async def run(self, job: Job) -> RunResult:
        """Run the job's program in its directory; each stream keeps its last `cap` bytes."""
        if not isinstance(job.where, OnHost):
            raise InvalidRequestError("the host runner runs on this machine only")
        if job.profile.kind == "llm":
            raise InvalidRequestError("an llm runner's tools act in a sandbox; it cannot run on the host")
        argv = ["bash", "-c", job.prompt] if job.profile.kind == "script" else command_argv(job.profile, job.prompt)
        ran = await run_on_host(
            argv, cwd=job.where.cwd, env=job.env, timeout_s=job.timeout_s, cap=self._cap, on_output=job.on_output
        )
        return RunResult(output=ran.stdout, exit_code=ran.exit_code, stderr=ran.stderr, timed_out=ran.timed_out)


@dataclass
class HostRun:
    """How a program on the host ended, and the last bytes of its output."""

    exit_code: int
    stdout: str
    stderr: str
    timed_out: bool


async def run_on_host(
    argv: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    timeout_s: float,
    cap: int,
    on_output: OutputCallback | None = None,
) -> HostRun:
    """Run `argv` in `cwd` with the inherited basics plus `env`. On timeout or cancel its whole
    session is killed; a run that exits by itself keeps its background children, as in a
    sandbox. Each stream keeps its last `cap` bytes; `on_output` hears each chunk as it comes."""
    environment = {key: os.environ[key] for key in _INHERITED if key in os.environ} | env
    process = await anyio.open_process(argv, cwd=cwd, env=environment, stdin=None, start_new_session=True)
    outputs: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    finished = False
    try:
        with anyio.move_on_after(timeout_s):
            async with anyio.create_task_group() as tg:
                assert process.stdout is not None and process.stderr is not None
                drained = [anyio.Event(), anyio.Event()]
                tg.start_soon(_drain, process.stdout, outputs["stdout"], cap, drained[0], "stdout", on_output)
                tg.start_soon(_drain, process.stderr, outputs["stderr"], cap, drained[1], "stderr", on_output)
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


async def _drain(
    stream: ByteReceiveStream, into: bytearray, cap: int, done: anyio.Event, name: str, on_output: OutputCallback | None
) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    async for chunk in stream:
        if on_output is not None and (text := decoder.decode(chunk)):
            await on_output(name, text)
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
