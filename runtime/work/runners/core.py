"""The runner core: picks the runner that does a job, by where it runs and its profile's kind.

Every runner in dockyard (a dispatch's, a dispatch member's, a user_pc run's) is run through
`Runners.run`; nothing else starts a runner by hand.
"""

from __future__ import annotations

from dockyard.runtime.runtimes.sandboxes import SandboxService
from dockyard.runtime.work.runners.base import Job, OnHost, Runner, RunResult
from dockyard.runtime.work.runners.host import HostRunner
from dockyard.runtime.work.runners.llm import LlmRunner
from dockyard.runtime.work.runners.sandbox import CommandRunner, ScriptRunner

__all__ = ["Runners"]


class Runners:
    """The runners of this dockyard: `script`, `command` and `llm` in sandboxes, and the host."""

    def __init__(self, sandboxes: SandboxService, host_cap_bytes: int) -> None:
        self._in_sandbox: dict[str, Runner] = {
            "script": ScriptRunner(sandboxes),
            "command": CommandRunner(sandboxes),
            "llm": LlmRunner(sandboxes),
        }
        self._host = HostRunner(host_cap_bytes)

    def runner_for(self, job: Job) -> Runner:
        """The runner that does `job`."""
        return self._host if isinstance(job.where, OnHost) else self._in_sandbox[job.profile.kind]

    async def run(self, job: Job) -> RunResult:
        """Run `job` to its end, its time limit or the caller's cancel (see `runners.base`)."""
        return await self.runner_for(job).run(job)
