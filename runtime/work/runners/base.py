"""What every runner takes and gives back: a job (what to run, where, as whom) and its result.

A run is started with `Runner.run(job)`. Its output streams to `job.on_output` while it runs;
cancelling the scope that awaits it cancels the run (what it started is killed: below the
sandbox's reaper, or the host session it leads); it is collected as the `RunResult` that
`run` returns. A run that passes `job.timeout_s` is killed and ends with `timed_out` set; a
runner that cannot run at all raises an error of the tree in `dockyard.runtime.substrate.errors`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dockyard.runtime.runtimes.commands import TIMEOUT_EXIT_CODE, OutputCallback
from dockyard.runtime.substrate.settings import Identity, RunnerProfile

__all__ = [
    "InSandbox",
    "Job",
    "LlmTools",
    "OnHost",
    "OutputCallback",
    "RunResult",
    "Runner",
    "SandboxTools",
    "command_argv",
]

# What a tool call of the `llm` runner does: (name, arguments) -> text for the model.
SandboxTools = Callable[[str, dict[str, Any]], Awaitable[str]]


@dataclass(frozen=True)
class InSandbox:
    """A run inside a sandbox, as its sandbox user (or `run_as`, one of the image's member users)."""

    sandbox_id: str
    run_as: str | None = None


@dataclass(frozen=True)
class OnHost:
    """A run on the machine dockyard runs on (dispatch mode `user_pc`), started in `cwd`."""

    cwd: Path


@dataclass(frozen=True)
class LlmTools:
    """Tools an `llm` run offers beyond the sandbox's: their specs, and a function that, given
    the sandbox tools, returns what carries out every call (sandbox and extra tools alike)."""

    specs: list[dict[str, Any]]
    carry_out: Callable[[SandboxTools], SandboxTools]


@dataclass(frozen=True)
class Job:
    """One run of a runner profile: what it does, where, as whom, with which environment.

    `prompt` is the script (`script`), the text put in place of `{prompt}` (`command`) or the
    task (`llm`). `env` is dockyard's own (attribution and the run's token), never a caller's.
    For `llm`, `conversation` goes on with earlier turns (it is appended to, in place),
    `system` opens a new one, and `tools` adds tools.
    """

    profile: RunnerProfile
    prompt: str
    owner: Identity
    where: InSandbox | OnHost
    timeout_s: int
    env: dict[str, str] = field(default_factory=dict)
    stdin: str | None = None
    on_output: OutputCallback | None = None
    conversation: list[dict[str, Any]] | None = None
    system: str | None = None
    tools: LlmTools | None = None


@dataclass(frozen=True)
class RunResult:
    """How a run ended: its output (the program's stdout, or the model's answer) and, for a
    program, its exit code and stderr."""

    output: str
    exit_code: int = 0
    stderr: str = ""
    timed_out: bool = False

    @property
    def is_ok(self) -> bool:
        """Whether the run did its work: it ended by itself, with exit code 0."""
        return self.exit_code == 0 and not self.timed_out

    @classmethod
    def timeout(cls, output: str, why: str) -> RunResult:
        """A run killed at its time limit."""
        return cls(output=output, exit_code=TIMEOUT_EXIT_CODE, stderr=why, timed_out=True)


class Runner(Protocol):
    """Does a job's work in its runtime and reports how it ended."""

    async def run(self, job: Job) -> RunResult:
        """Run `job` to its end, its time limit or the caller's cancel."""
        ...


def command_argv(profile: RunnerProfile, prompt: str) -> list[str]:
    """A `command` profile's argv with each `{prompt}` replaced by the prompt: one argument,
    never shell text."""
    return [arg.replace("{prompt}", prompt) for arg in profile.argv]
