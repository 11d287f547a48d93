"""The client side of the MCP Tasks extension, on the official SDK's extension API, for tests.

`TasksClient()` in `Client(extensions=[...])` declares `io.modelcontextprotocol/tasks` on every
request and claims results whose `resultType` is "task": `client.call_tool` then polls
`tasks/get` until the task ends and returns the tool's result, as a client that drives tasks
for its caller would. `handle(...)` gets the task handle itself; `get`, `cancel` and `update`
send the extension's requests.
"""

from __future__ import annotations

from typing import Any, Literal

import anyio
from mcp import Client
from mcp.client.extension import ClaimContext, ClientExtension, ResultClaim
from mcp.client.session import ClientSession
from mcp.types import CallToolResult, Request, RequestParams, Result

__all__ = ["TASKS", "DetailedTask", "TaskHandle", "TasksClient", "cancel", "get", "handle", "until_done", "update"]

TASKS = "io.modelcontextprotocol/tasks"


class TaskHandle(Result):
    """A CreateTaskResult: the task, in place of the tool's result."""

    result_type: Literal["task"]
    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None = None
    poll_interval_ms: int | None = None


class DetailedTask(Result):
    """A tasks/get answer: the task, with its result or error once it ended."""

    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None = None
    poll_interval_ms: int | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None


class _TaskParams(RequestParams):
    task_id: str


class _UpdateParams(_TaskParams):
    input_responses: dict[str, Any]


class _TaskRequest(Request[_TaskParams, str]):
    method: str
    params: _TaskParams
    name_param = "taskId"


class _UpdateRequest(Request[_UpdateParams, str]):
    method: str
    params: _UpdateParams
    name_param = "taskId"


async def get(session: ClientSession, task_id: str) -> DetailedTask:
    return await session.send_request(
        _TaskRequest(method="tasks/get", params=_TaskParams(task_id=task_id)), DetailedTask
    )


async def cancel(session: ClientSession, task_id: str) -> None:
    await session.send_request(_TaskRequest(method="tasks/cancel", params=_TaskParams(task_id=task_id)), Result)


async def update(session: ClientSession, task_id: str, responses: dict[str, Any]) -> None:
    params = _UpdateParams(task_id=task_id, input_responses=responses)
    await session.send_request(_UpdateRequest(method="tasks/update", params=params), Result)


async def until_done(session: ClientSession, task_id: str, timeout_s: float = 120) -> DetailedTask:
    """Poll tasks/get until the task is completed, failed or cancelled."""
    with anyio.fail_after(timeout_s):
        while (task := await get(session, task_id)).status not in ("completed", "failed", "cancelled"):
            await anyio.sleep(min((task.poll_interval_ms or 1000) / 1000, 0.2))
    return task


async def _resolve(handle: TaskHandle, ctx: ClaimContext) -> CallToolResult:
    task = await until_done(ctx.session, handle.task_id)
    assert task.status == "completed" and task.result is not None, f"task ended {task.status}: {task.error}"
    return CallToolResult.model_validate(task.result)


class TasksClient(ClientExtension):
    """Declares the Tasks extension and resolves task handles by polling."""

    identifier = TASKS

    def claims(self) -> list[ResultClaim[Any]]:
        return [ResultClaim(result_type="task", model=TaskHandle, resolve=_resolve)]


async def handle(client: Client, tool: str, **arguments: Any) -> TaskHandle | CallToolResult:
    """Call a tool and return what came back: a task handle, or the tool's own result."""
    result = await client.session.call_tool(tool, arguments, allow_claimed=True)
    assert isinstance(result, TaskHandle | CallToolResult), result
    return result
