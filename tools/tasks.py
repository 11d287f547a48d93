"""The MCP Tasks extension (`io.modelcontextprotocol/tasks`): long calls answered with a task handle.

A client that declares the extension on its request (per-request capabilities, protocol
2026-07-28) may get a task instead of a result: `dispatch` always (the task ends when the
dispatch does, with the result `dispatch` returns, in the dispatch's final state), and
`sandbox_exec` or `sandbox_create` when they run longer than `ANSWER_WITHIN_S` (a long command,
a create waiting for an image or the pool; the call goes on after the handle returns). The client
polls `tasks/get` and may stop the work with `tasks/cancel`. Every other call, and every client
that does not declare the extension, is answered as before.

A task is bound to the token that made it: any other token, or another workspace, is told
"task not found", the same answer as for an id that never existed.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import anyio
from mcp import MCPError
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.server.mcpserver import require_client_extension
from mcp.server.mcpserver.tools import Tool
from mcp.types import CallToolRequestParams, CallToolResult, RequestParams
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import Field

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.actions import Action
from dockyard.runtime.substrate.errors import AccessDeniedError, DockyardError, NotFoundError
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import CallTask, CallTaskStatus, DispatchStatus
from dockyard.runtime.work.calltasks import TASK_TTL_S, CallOutcome
from dockyard.tools import dispatch as dispatch_tools
from dockyard.tools._context import calling

__all__ = ["ANSWER_WITHIN_S", "TASKS", "TasksExtension"]

log = logging.getLogger("dockyard.tools")

TASKS = "io.modelcontextprotocol/tasks"
ANSWER_WITHIN_S = 1.0  # a long call that ends sooner is answered directly, not with a task
POLL_INTERVAL_MS = 1000
_LONG_CALLS = frozenset({"sandbox_exec", "sandbox_create"})
_DISPATCH_WORKING = frozenset({DispatchStatus.QUEUED, DispatchStatus.RUNNING})

Ctx = ServerRequestContext[Engine, Any]
T = TypeVar("T")


class TaskParams(RequestParams):
    """tasks/get and tasks/cancel: the task's id."""

    task_id: Annotated[str, Field(max_length=200)]


class UpdateTaskParams(TaskParams):
    """tasks/update: responses to a task's input requests (no dockyard task asks for any)."""

    input_responses: dict[str, Any] | None = None


class TasksExtension(Extension):
    """Serves tasks/get, tasks/update and tasks/cancel, and answers long calls with tasks."""

    identifier = TASKS

    def __init__(self) -> None:
        # The dispatch tool's own conversion, so a dispatch's task ends with the very result
        # shape `dispatch` returns.
        self._dispatch_result = Tool.from_function(dispatch_tools.dispatch).fn_metadata.convert_result

    def methods(self) -> list[MethodBinding]:
        return [
            MethodBinding("tasks/get", TaskParams, self._get),
            MethodBinding("tasks/update", UpdateTaskParams, self._update),
            MethodBinding("tasks/cancel", TaskParams, self._cancel),
        ]

    async def intercept_tool_call(self, params: CallToolRequestParams, ctx: Ctx, call_next: CallNext) -> HandlerResult:
        if not _declared(ctx) or (params.name != "dispatch" and params.name not in _LONG_CALLS):
            return await call_next(ctx)
        opened: Engine = ctx.lifespan_context
        who = calling(opened)
        if params.name == "dispatch":
            result = await call_next(ctx)
            made = result.structured_content if isinstance(result, CallToolResult) and not result.is_error else None
            if not made or not isinstance(made.get("dispatch_id"), str):
                return result  # refused at once (or asking for input first): no task
            row = await opened.calltasks.create(who, "dispatch", made["dispatch_id"])
            return {"resultType": "task", **_task(row, CallTaskStatus.WORKING, row.status_message)}

        async def work() -> tuple[object, CallOutcome]:
            try:
                value = await call_next(ctx)
            except MCPError as exc:
                return exc, CallOutcome(CallTaskStatus.FAILED, exc.error.model_dump(mode="json", exclude_none=True))
            except Exception as exc:  # the SDK's chain raised past the tool: a protocol-level failure
                ref = secrets.token_hex(4)
                log.exception("tools/call %s as a task failed (ref %s)", params.name, ref)
                error = {
                    "code": INTERNAL_ERROR,
                    "message": f"internal error (ref {ref}); the server log has the details",
                }
                return exc, CallOutcome(CallTaskStatus.FAILED, error)
            if isinstance(value, dict):
                return value, CallOutcome(CallTaskStatus.COMPLETED, dict(value))
            dumped = value.model_dump(by_alias=True, mode="json", exclude_none=True) if value is not None else {}
            return value, CallOutcome(CallTaskStatus.COMPLETED, dumped)

        call = opened.calltasks.begin(work)
        try:
            with anyio.move_on_after(ANSWER_WITHIN_S):
                await call.done.wait()
            if call.done.is_set():
                if isinstance(call.value, BaseException):
                    raise call.value
                return call.value  # type: ignore[return-value]  # what call_next returned, as it returned it
            row = await opened.calltasks.adopt(who, params.name, call)
        except anyio.get_cancelled_exc_class():
            call.scope.cancel()  # the client gave up before a task took the call over
            raise
        return {"resultType": "task", **_task(row, CallTaskStatus.WORKING, row.status_message)}

    async def _get(self, ctx: Ctx, params: TaskParams) -> dict[str, Any]:
        opened, who, row = await _owned(ctx, params.task_id, Action.TASK_GET)
        if row.dispatch_id is None:
            detail = _task(row, CallTaskStatus(row.status), row.status_message)
            if row.status == CallTaskStatus.COMPLETED:
                detail["result"] = row.result
            elif row.status == CallTaskStatus.FAILED:
                detail["error"] = row.error
            return detail
        info = await _mapped(opened.dispatches.get(who, row.dispatch_id))
        message = f"dispatch {info.dispatch_id} is {info.status}"
        if info.status in _DISPATCH_WORKING:
            return _task(row, CallTaskStatus.WORKING, message)
        if info.status == DispatchStatus.CANCELLED:
            return _task(row, CallTaskStatus.CANCELLED, message)
        if info.status == DispatchStatus.INTERRUPTED:
            message += ": dockyard restarted while it ran, and it is not re-run"
        detail = _task(row, CallTaskStatus.COMPLETED, message)
        result = self._dispatch_result(info)
        detail["result"] = result.model_dump(by_alias=True, mode="json", exclude_none=True)
        return detail

    async def _update(self, ctx: Ctx, params: UpdateTaskParams) -> dict[str, Any]:
        await _owned(ctx, params.task_id, Action.TASK_UPDATE)
        return {}  # no dockyard task waits for input, so every response is one not asked for: ignored

    async def _cancel(self, ctx: Ctx, params: TaskParams) -> dict[str, Any]:
        opened, who, row = await _owned(ctx, params.task_id, Action.TASK_CANCEL)
        if row.dispatch_id is not None:
            await _mapped(opened.dispatches.cancel(who, row.dispatch_id))
        else:
            await _mapped(opened.calltasks.cancel(who, row.id))
            await opened.audit.append(
                who, Action.TASK_CANCEL, target=row.tool, outcome="ok", detail={"token_id": who.token_id}
            )
        return {}


def _declared(ctx: Ctx) -> bool:
    """Whether this request declares the extension, on a protocol version whose results can say
    `resultType: "task"` (2026-07-28 on): the spec lets the server choose only then."""
    if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
        return False
    capabilities = ctx.session.client_capabilities
    return capabilities is not None and capabilities.extensions is not None and TASKS in capabilities.extensions


async def _owned(ctx: Ctx, task_id: str, action: Action) -> tuple[Engine, Identity, CallTask]:
    """The engine, the caller (if their token is live) and the task, if it is theirs."""
    require_client_extension(ctx, TASKS)
    opened: Engine = ctx.lifespan_context
    who = await _mapped(opened.tokens.live(calling(opened), action))
    try:
        row = await opened.calltasks.get(who, task_id)
    except NotFoundError as exc:
        # The presented id is not written down: it may be another caller's handle.
        await opened.tokens.deny(who, action, "no such task for this token")
        raise MCPError(code=INVALID_PARAMS, message=f"Failed to retrieve task: {exc}") from exc
    return opened, who, row


async def _mapped(pending: Awaitable[T]) -> T:
    """Await an engine call; its refusal becomes a JSON-RPC error with the engine's message."""
    try:
        return await pending
    except AccessDeniedError as exc:
        raise MCPError(code=INVALID_REQUEST, message=str(exc)) from exc
    except DockyardError as exc:
        raise MCPError(code=INVALID_PARAMS, message=str(exc)) from exc


def _task(row: CallTask, status: CallTaskStatus, message: str | None) -> dict[str, Any]:
    """A task as the wire has it (the fields every status shares)."""
    task: dict[str, Any] = {
        "taskId": row.id,
        "status": status.value,
        "createdAt": _iso(row.created_at),
        "lastUpdatedAt": _iso(row.updated_at),
        "ttlMs": TASK_TTL_S * 1000,
        "pollIntervalMs": POLL_INTERVAL_MS,
    }
    if message:
        task["statusMessage"] = message
    return task


def _iso(when: datetime) -> str:
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).isoformat().replace("+00:00", "Z")
