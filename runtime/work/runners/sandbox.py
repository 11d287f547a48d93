"""The `script` and `command` runners: one program run in the job's sandbox.

`script`: the prompt is a bash script, run as the sandbox user. `command`: a program from the
template's image, its argv from the profile with the prompt as one argument (never through a
shell). Both run through the sandbox's supervisor, so output streams, the time limit is
enforced in the sandbox and a cancel kills everything the program started.
"""

from __future__ import annotations

from dockyard.runtime.runtimes.sandboxes import SandboxService
from dockyard.runtime.substrate.errors import InvalidRequestError
from dockyard.runtime.work.runners.base import InSandbox, Job, RunResult, command_argv

__all__ = ["CommandRunner", "ScriptRunner"]


class _ProgramRunner:
    """Runs the program a job names in its sandbox, as the job's owner."""

    def __init__(self, sandboxes: SandboxService) -> None:
        self._sandboxes = sandboxes

    def _program(self, job: Job) -> str | list[str]:
        raise NotImplementedError

    async def run(self, job: Job) -> RunResult:
        """Run the job's program to its end or its time limit."""
        if not isinstance(job.where, InSandbox):
            raise InvalidRequestError(f"the {job.profile.kind} runner runs in a sandbox; give the job one")
        ran = await self._sandboxes.exec(
            job.owner,
            job.where.sandbox_id,
            self._program(job),
            timeout_s=job.timeout_s,
            stdin=job.stdin,
            on_output=job.on_output,
            runner_env=job.env or None,
            run_as=job.where.run_as,
        )
        return RunResult(output=ran.stdout, exit_code=ran.exit_code, stderr=ran.stderr, timed_out=ran.timed_out)


class ScriptRunner(_ProgramRunner):
    """The prompt is a bash script."""

    def _program(self, job: Job) -> str:
        return job.prompt


class CommandRunner(_ProgramRunner):
    """The profile's argv, each `{prompt}` replaced by the prompt."""

    def _program(self, job: Job) -> list[str]:
        return command_argv(job.profile, job.prompt)
