"""The `llm` runner: a tool-using loop against an OpenAI-compatible chat-completions endpoint.

The loop runs on the server. The model gets the task and three tools that act in the run's
sandbox (run a command, read a file, write a file), plus any tools the job adds; each tool
call is carried out and its result handed back, until the model answers without calling a
tool, which is the run's result. The endpoint's key stays on the server; the sandbox never
sees it.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx

from dockyard.runtime.runtimes.commands import OutputCallback
from dockyard.runtime.runtimes.sandboxes import SandboxService
from dockyard.runtime.substrate.errors import DockyardError, InvalidRequestError, LlmRunnerError
from dockyard.runtime.substrate.settings import Identity, RunnerProfile
from dockyard.runtime.work.runners.base import InSandbox, Job, RunResult, SandboxTools

__all__ = ["SYSTEM", "TOOLS", "LlmRunner", "opening", "run_llm", "sandbox_tools"]

SYSTEM = (
    "You do a task in an isolated Linux sandbox (Debian, /workspace is your working directory). "
    "Use the tools to run commands and to read and write files. When the task is done, answer "
    "with the result and call no tool."
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "exec",
            "description": "Run a bash command in the sandbox; returns its exit code, stdout and stderr.",
            "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a text file under /workspace.",
            "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "description": "Write a text file under /workspace (parents are created).",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                "required": ["path", "content"],
            },
        },
    },
]
_TOOL_RESULT_CAP = 16 * 1024


class LlmRunner:
    """Runs a job as a conversation with a model whose tools act in the job's sandbox."""

    def __init__(self, sandboxes: SandboxService) -> None:
        self._sandboxes = sandboxes

    async def run(self, job: Job) -> RunResult:
        """Drive the model until it answers without a tool call, or until the job's time limit."""
        if not isinstance(job.where, InSandbox):
            raise InvalidRequestError("an llm runner's tools act in a sandbox; it cannot run on the host")
        sandbox = sandbox_tools(
            self._sandboxes, job.owner, job.where.sandbox_id, job.env, job.where.run_as, on_output=job.on_output
        )
        conversation = job.conversation if job.conversation is not None else opening(job.prompt, job.system or SYSTEM)
        specs, carry_out = (
            (TOOLS, sandbox) if job.tools is None else ([*TOOLS, *job.tools.specs], job.tools.carry_out(sandbox))
        )
        answer = ""
        with anyio.move_on_after(job.timeout_s) as limit:
            answer = await run_llm(job.profile, conversation, carry_out, specs, on_output=job.on_output)
        if limit.cancelled_caught:
            return RunResult.timeout("", f"the model did not finish within {job.timeout_s} s")
        if job.on_output is not None:
            await job.on_output("stdout", answer)
        return RunResult(output=answer)


def sandbox_tools(
    sandboxes: SandboxService,
    owner: Identity,
    sandbox_id: str,
    env: dict[str, str],
    run_as: str | None = None,
    on_output: OutputCallback | None = None,
) -> SandboxTools:
    """The sandbox tools, acting in `sandbox_id` as `owner` (commands also get `env`, run as
    the sandbox user `run_as` when given, and stream their output to `on_output`)."""

    async def carry_out(name: str, arguments: dict[str, Any]) -> str:
        if name == "exec":
            ran = await sandboxes.exec(
                owner, sandbox_id, str(arguments.get("command", "")), runner_env=env, run_as=run_as, on_output=on_output
            )
            return json.dumps({"exit_code": ran.exit_code, "stdout": ran.stdout, "stderr": ran.stderr})
        if name == "read_file":
            return (await sandboxes.read_file(owner, sandbox_id, str(arguments.get("path", "")), "utf-8", None)).content
        written = await sandboxes.write_file(
            owner, sandbox_id, str(arguments.get("path", "")), str(arguments.get("content", "")), "utf-8"
        )
        return f"wrote {written.size} bytes to {written.path}"

    return carry_out


def opening(prompt: str, system: str = SYSTEM) -> list[dict[str, Any]]:
    """A new conversation: the system prompt and the task."""
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


async def run_llm(
    profile: RunnerProfile,
    messages: list[dict[str, Any]],
    tools: SandboxTools,
    specs: list[dict[str, Any]] = TOOLS,
    on_output: OutputCallback | None = None,
) -> str:
    """Drive the model until it answers without a tool call; returns that answer.

    `messages` is the conversation so far (see `opening`); every turn and tool result is
    appended to it, so a caller that keeps it can go on with the same conversation later.
    `specs` are the tools offered (the sandbox tools by default); `tools` carries them out.
    `on_output` hears what the model says on its way (text beside its tool calls) and a line
    for each tool call; the final answer is the caller's to tell.
    """
    assert profile.url and profile.model
    headers = {"Authorization": f"Bearer {profile.api_key.get_secret_value()}"} if profile.api_key else {}
    url = profile.url.rstrip("/") + "/chat/completions"
    names = {spec["function"]["name"] for spec in specs}
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0, connect=10.0)) as http:
        for _ in range(profile.max_steps):
            message = await _turn(http, url, headers, {"model": profile.model, "messages": messages, "tools": specs})
            messages.append(message)
            calls = message.get("tool_calls") or []
            if not calls:
                return str(message.get("content") or "")
            if on_output is not None:
                await on_output("stdout", _narration(message, calls))
            for call in calls:
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": call.get("id", ""),
                        "content": await _carry_out(call, tools, names),
                    }
                )
    raise LlmRunnerError(f"the model did not finish within {profile.max_steps} turns")


def _narration(message: dict[str, Any], calls: list[Any]) -> str:
    """What a turn that calls tools shows while the run goes on: its text, then one line per call."""
    said = str(message.get("content") or "").strip()
    lines = [said] if said else []
    for call in calls:
        function = (call.get("function") if isinstance(call, dict) else None) or {}
        lines.append(f"-> {function.get('name', '?')} {str(function.get('arguments') or '')[:200]}")
    return "\n".join(lines) + "\n"


async def _turn(http: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    try:
        response = await http.post(url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        raise LlmRunnerError(f"the model endpoint {url} could not be reached: {exc}") from exc
    if response.status_code != 200:
        raise LlmRunnerError(f"the model endpoint answered {response.status_code}: {response.text[:300]}")
    try:
        message = response.json()["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise LlmRunnerError(f"the model endpoint answered without a message: {response.text[:300]}") from exc
    if not isinstance(message, dict):
        raise LlmRunnerError("the model endpoint's message is not an object")
    return message


async def _carry_out(call: dict[str, Any], tools: SandboxTools, names: set[str]) -> str:
    """One tool call's result as text; a bad call is reported to the model, not raised."""
    function = call.get("function") or {}
    name = function.get("name", "")
    try:
        arguments = json.loads(function.get("arguments") or "{}")
        if not isinstance(arguments, dict):
            raise ValueError("arguments must be a JSON object")
    except ValueError as exc:
        return f"error: the arguments of {name} are not valid JSON ({exc})"
    if name not in names:
        return f"error: there is no tool '{name}'; use {', '.join(sorted(names))}"
    try:
        return (await tools(name, arguments))[:_TOOL_RESULT_CAP]
    except (InvalidRequestError, DockyardError) as exc:
        return f"error: {exc}"
