"""The runner core: one way to run a runner (`script`, `command`, `llm`, or on the host).

A job says what to run (a profile and its prompt), where (a sandbox, or the host), as whom
(an identity) and with which environment; `Runners.run(job)` runs it, streaming its output
to the job's callback, killing it on cancel, and returns how it ended.
"""

from dockyard.runtime.work.runners.base import (
    InSandbox,
    Job,
    LlmTools,
    OnHost,
    OutputCallback,
    Runner,
    RunResult,
    SandboxTools,
    command_argv,
)
from dockyard.runtime.work.runners.core import Runners
from dockyard.runtime.work.runners.llm import SYSTEM, TOOLS, opening, run_llm, sandbox_tools

__all__ = [
    "SYSTEM",
    "TOOLS",
    "InSandbox",
    "Job",
    "LlmTools",
    "OnHost",
    "OutputCallback",
    "RunResult",
    "Runner",
    "Runners",
    "SandboxTools",
    "command_argv",
    "opening",
    "run_llm",
    "sandbox_tools",
]
