"""What the dispatch service and its runs share: the runs alive in this process, how a change
to a dispatch's row is written and told, and how a row is shown and whom its runner acts as."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta

import anyio
from sqlmodel import Session, col, func, select

from dockyard.runtime.runtimes.commands import OutputCallback
from dockyard.runtime.runtimes.outputs import head_tail
from dockyard.runtime.substrate.actions import Scope
from dockyard.runtime.substrate.errors import QuotaExceededError
from dockyard.runtime.substrate.models import DispatchInfo
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import Dispatch, DispatchStatus, Store, utcnow
from dockyard.runtime.work.dispatch.states import Move, step

__all__ = [
    "INTERRUPTED",
    "RESULT_CAP",
    "RUN_SCOPES",
    "Board",
    "Running",
    "info",
    "runner_env",
    "runner_identity",
    "within_rate",
]

log = logging.getLogger(__name__)

# What a runner's own token may do: work in sandboxes of its run, read dispatches.
RUN_SCOPES = [Scope.SANDBOX_EXEC, Scope.SANDBOX_FILES, Scope.DISPATCH_READ]
RESULT_CAP = 64 * 1024
INTERRUPTED = "dockyard stopped while it ran; it was not re-run (dispatch it again if you want it)"
# How much of a run's latest output a waiter that joins late hears first.
OUTPUT_KEPT = 4096


@dataclass
class Running:
    """A dispatch's background task, for cancel and for waiters, and its output as it comes."""

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    changed: anyio.Event = field(default_factory=anyio.Event)
    listeners: set[OutputCallback] = field(default_factory=set)
    latest: deque[tuple[str, str]] = field(default_factory=deque)  # (stream, text), about OUTPUT_KEPT characters
    _kept: int = 0

    async def output(self, stream: str, text: str) -> None:
        """Output of the run's runner (or of a member, labelled): kept, and told to every listener."""
        self.latest.append((stream, text))
        self._kept += len(text)
        while self._kept - len(self.latest[0][1]) >= OUTPUT_KEPT:
            self._kept -= len(self.latest.popleft()[1])
        for listener in list(self.listeners):
            await listener(stream, text)

    async def listen(self, listener: OutputCallback) -> None:
        """Tell `listener` the latest output (up to OUTPUT_KEPT characters), then everything new."""
        for stream, text in list(self.latest):
            await listener(stream, text)
        self.listeners.add(listener)


class Board:
    """The dispatches running in this process; every write to a dispatch's row goes through
    here, so that waiters and subscribers hear of each change."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.running: dict[str, Running] = {}
        # Told the id and workspace of a dispatch whose state changed (the server wakes that
        # workspace's subscribers with it).
        self.on_change: Callable[[str, str], Awaitable[None]] | None = None

    async def write(self, dispatch_id: str, *, notify: bool = True, **values: object) -> Dispatch:
        """Set fields of a dispatch other than its status (which only moves, see `move`)."""
        assert "status" not in values, "a dispatch's status changes only by a move of dispatch.states"
        updated = await self._store.update(Dispatch, dispatch_id, **values)
        assert updated is not None
        if notify:
            await self._tell(updated)
        return updated

    async def move(self, dispatch_id: str, to: Move | DispatchStatus, **values: object) -> Dispatch:
        """Move a dispatch along `to` (or end it in the final state `to`) in the transaction
        that reads it; raises `StateError` if its state does not allow it."""
        moved = await self._store.run(step(dispatch_id, to, **values))
        await self._tell(moved)
        return moved

    async def change(self, write: Callable[[Session], Dispatch | None]) -> Dispatch | None:
        """Run `write` (which reads and moves one dispatch) in one transaction, then tell of
        the dispatch it returns (nothing, if it returns None: nothing changed)."""
        updated = await self._store.run(write)
        if updated is not None:
            await self._tell(updated)
        return updated

    async def _tell(self, row: Dispatch) -> None:
        if (running := self.running.get(row.id)) is not None:
            running.changed.set()
            running.changed = anyio.Event()
        if self.on_change is not None:
            try:
                await self.on_change(row.id, row.workspace_id)
            except Exception:  # a subscriber's trouble must not stop the dispatch
                log.exception("dispatch %s: change notification failed", row.id)


def info(row: Dispatch, hint: str | None, budget_chars: int | None = None) -> DispatchInfo:
    """A dispatch as its caller sees it: with `budget_chars`, its result, error and members'
    results cut (head and tail) to fit, the whole left to its resource."""
    final = row.status in DispatchStatus.FINAL
    whole = DispatchInfo(
        dispatch_id=row.id,
        mode=row.mode,
        requested_mode=row.requested_mode,
        hint=hint,
        runner=row.runner,
        status=row.status,
        result=row.result,
        error=row.error,
        sandbox_id=row.sandbox_id,
        members=row.member_results,
        next_steps=None
        if final
        else f"call await_dispatch(dispatch_id='{row.id}') to collect the result; it keeps running meanwhile",
    )
    return whole if budget_chars is None else _fitted(whole, budget_chars)


def _fitted(whole: DispatchInfo, budget_chars: int) -> DispatchInfo:
    where = f"dockyard://dispatches/{whole.dispatch_id}"
    members = whole.members or []
    share = max(budget_chars // 4 // max(len(members), 1), 200)

    def cut(text: str | None, limit: int) -> str | None:
        return None if text is None else head_tail(text, limit, where)[0]

    return whole.model_copy(
        update={
            "result": cut(whole.result, budget_chars // 2),
            "error": cut(whole.error, budget_chars // 8),
            "members": [
                {k: cut(v, share) if isinstance(v, str) else v for k, v in member.items()} for member in members
            ]
            if whole.members is not None
            else None,
        }
    )


def within_rate(session: Session, workspace_id: str, per_minute: int) -> None:
    """Refuse one more dispatch of a workspace that started `per_minute` in the last 60 s (0: no limit)."""
    if not per_minute:
        return
    since = utcnow() - timedelta(seconds=60)
    started = session.exec(
        select(func.count())
        .select_from(Dispatch)
        .where(Dispatch.workspace_id == workspace_id, col(Dispatch.created_at) >= since)
    ).one()
    if started >= per_minute:
        raise QuotaExceededError(
            f"quota dispatches_per_minute reached: workspace '{workspace_id}' started {started} dispatches in the last "
            f"60 s and the limit is {per_minute}; wait before dispatching again, or ask the operator for a higher quota"
        )


def runner_identity(row: Dispatch) -> Identity:
    """What a dispatch's runner acts as: its caller's attribution, as a run of its own."""
    return Identity(
        workspace_id=row.workspace_id,
        project_id=row.project_id,
        user_id=row.user_id,
        run_id=row.id,
        scopes=[Scope.SANDBOX_CREATE, *RUN_SCOPES],
    )


def runner_env(row: Dispatch, token: str) -> dict[str, str]:
    """The attribution a runner sees, and its run's token (never an admin or tenant key)."""
    return {
        "DOCKYARD_WORKSPACE_ID": row.workspace_id,
        "DOCKYARD_PROJECT_ID": row.project_id,
        "DOCKYARD_USER_ID": row.user_id,
        "DOCKYARD_RUN_ID": row.id,
        "DOCKYARD_DISPATCH_ID": row.id,
        "DOCKYARD_TOKEN": token,
    }
