r"""Long tool calls handed back as tasks: the durable row behind each task handle, the calls that
go on after their handle was returned, and what a restart did to them.

A task is bound to the token that made it: any other token, or another workspace, finds no such
task (the same answer as for an id that never existed). Its id is 256 random bits.

    working --the call returned--> completed
           \--the call raised-----> failed        (a protocol error; or dockyard restarted meanwhile)
           \--cancel--------------> cancelled

A dispatch's task keeps no state of its own: its row names the dispatch, whose state is read
whenever the task is (so after a restart it says what the dispatch says). Every other task's
call runs in this service's task group; its outcome is written to the row when it ends. After a
restart, tasks whose call was cut short are failed, with a message saying so; none is re-run.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import anyio
import anyio.abc
from sqlmodel import Session, col, select

from dockyard.runtime.substrate.errors import NotFoundError, StateError
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import CallTask, CallTaskStatus, Store, utcnow

__all__ = ["INTERRUPTED_ERROR", "TASK_TTL_S", "Call", "CallOutcome", "CallTaskService"]

log = logging.getLogger(__name__)

TASK_TTL_S = 24 * 3600  # how long a task is kept after it was made
INTERRUPTED_ERROR = {
    "code": -32603,  # JSON-RPC internal error: the call never produced a result
    "message": "dockyard restarted while this call ran, so it was cut short and has no result; it is not re-run",
}


@dataclass(frozen=True)
class CallOutcome:
    """How a call ended: `completed` with the wire's result, or `failed` with a JSON-RPC error."""

    status: CallTaskStatus
    payload: dict


@dataclass
class Call:
    """A call under way in the service's task group: answered directly if it ends soon enough,
    else adopted by a task (`CallTaskService.adopt`) that records how it ends."""

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)
    value: object = None  # what the call returned (or raised), for a direct answer
    outcome: CallOutcome | None = None
    task_id: str | None = None
    cancelled_by_owner: bool = False


class CallTaskService:
    """Makes, reads, runs and cancels tasks; a dispatch's task is cancelled through its dispatch."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._calls: dict[str, Call] = {}
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Fail what a restart cut short, drop expired tasks, then hold the running calls."""

        def recover(session: Session) -> None:
            for row in session.exec(select(CallTask).where(col(CallTask.expires_at) < utcnow())).all():
                session.delete(row)
            cut = select(CallTask).where(CallTask.status == CallTaskStatus.WORKING, col(CallTask.dispatch_id).is_(None))
            for row in session.exec(cut).all():
                _finish(row, CallOutcome(CallTaskStatus.FAILED, INTERRUPTED_ERROR), "interrupted by a restart")
                session.add(row)

        await self._store.run(recover)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            task_status.started()
            await anyio.sleep_forever()

    async def create(self, who: Identity, tool: str, dispatch_id: str | None = None) -> CallTask:
        """A new task bound to `who`'s token, committed before it is returned."""
        now = utcnow()
        row = CallTask(
            id=f"tsk_{secrets.token_urlsafe(32)}",
            tool=tool,
            dispatch_id=dispatch_id,
            status_message=f"{tool} is running",
            workspace_id=who.workspace_id,
            project_id=who.project_id,
            user_id=who.user_id,
            token_id=who.token_id,
            created_at=now,
            updated_at=now,
            expires_at=now + timedelta(seconds=TASK_TTL_S),
        )
        return await self._store.add(row)

    async def get(self, who: Identity, task_id: str) -> CallTask:
        """The task, if it is bound to `who`'s very token (and workspace) and not expired."""
        row = await self._store.get(CallTask, task_id)
        if (
            row is None
            or row.workspace_id != who.workspace_id
            or row.token_id != who.token_id
            or _aware(row.expires_at) < utcnow()
        ):
            raise NotFoundError("task not found: no task with this id was made by this token, or it has expired")
        return row

    def begin(self, work: Callable[[], Awaitable[tuple[object, CallOutcome]]]) -> Call:
        """Start `work` in the background; it goes on when the request that began it returns."""
        assert self._tg is not None, "the task service is not running"
        call = Call()
        self._tg.start_soon(self._drive, work, call)
        return call

    async def _drive(self, work: Callable[[], Awaitable[tuple[object, CallOutcome]]], call: Call) -> None:
        try:
            with call.scope:
                call.value, call.outcome = await work()
        finally:
            call.done.set()

    async def adopt(self, who: Identity, tool: str, call: Call) -> CallTask:
        """A task for a call under way: committed first, then told how the call ends."""
        row = await self.create(who, tool)
        call.task_id = row.id
        self._calls[row.id] = call
        assert self._tg is not None, "the task service is not running"
        self._tg.start_soon(self._record_end, call)
        return row

    async def _record_end(self, call: Call) -> None:
        assert call.task_id is not None
        try:
            await call.done.wait()
            with anyio.CancelScope(shield=True):
                if call.outcome is not None:
                    await self._store.run(_record(call.task_id, call.outcome, None))
                elif call.cancelled_by_owner:
                    await self._store.run(_record(call.task_id, None, "cancelled by its owner"))
                # else dockyard is stopping: the next start fails the task as interrupted
        finally:
            self._calls.pop(call.task_id, None)

    async def cancel(self, who: Identity, task_id: str) -> CallTask:
        """Stop a task's call (it ends as cancelled); a finished task stays as it ended."""
        row = await self.get(who, task_id)
        if row.dispatch_id is not None:
            raise StateError("a dispatch's task is cancelled through its dispatch")
        call = self._calls.get(task_id)
        if call is not None:
            call.cancelled_by_owner = True
            call.scope.cancel()
            with anyio.fail_after(60):
                while task_id in self._calls:
                    await anyio.sleep(0.02)
        return await self.get(who, task_id)


def _record(task_id: str, outcome: CallOutcome | None, message: str | None) -> Callable[[Session], None]:
    def write(session: Session) -> None:
        row = session.get(CallTask, task_id)
        if row is None or row.status in CallTaskStatus.FINAL:
            return
        if outcome is None:
            row.status, row.status_message, row.updated_at = CallTaskStatus.CANCELLED.value, message, utcnow()
        else:
            _finish(row, outcome, message)
        session.add(row)

    return write


def _finish(row: CallTask, outcome: CallOutcome, message: str | None) -> None:
    if row.status != CallTaskStatus.WORKING:
        raise StateError(f"task is {row.status}, so it cannot end again")
    row.status, row.updated_at = outcome.status.value, utcnow()
    if outcome.status == CallTaskStatus.COMPLETED:
        row.result, row.status_message = outcome.payload, message or f"{row.tool} finished"
    else:
        row.error = outcome.payload
        row.status_message = message or f"{row.tool} failed: {outcome.payload.get('message', '')}"[:500]


def _aware(when: datetime) -> datetime:
    """SQLite hands datetimes back naive; they were stored in UTC."""
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when
