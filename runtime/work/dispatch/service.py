"""The dispatch service: create, wait on, cancel and list dispatches, and take their runners'
submitted results.

A dispatch is a row from the moment `dispatch` returns (status queued); a task of this service
then runs it (see `dispatch.run`), and `wait` reads the store. After a restart, dispatches that
were running are marked interrupted (never re-run behind the caller's back), the sandboxes
finished ones still hold are given back, and queued ones start.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
from sqlmodel import Session, col, or_, select

from dockyard.runtime.runtimes.commands import OutputCallback
from dockyard.runtime.runtimes.poolstatus import pool_status
from dockyard.runtime.runtimes.sandboxes import SandboxService
from dockyard.runtime.substrate.actions import Action
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.errors import DockyardError, NotFoundError, QuotaExceededError, StateError
from dockyard.runtime.substrate.listings import DispatchPage, DispatchRow, Window, clip
from dockyard.runtime.substrate.models import DispatchInfo
from dockyard.runtime.substrate.runs import link_run
from dockyard.runtime.substrate.settings import Identity, Settings
from dockyard.runtime.substrate.store import (
    Dispatch,
    DispatchDecision,
    DispatchStatus,
    RunLink,
    Sandbox,
    SandboxStatus,
    Store,
    utcnow,
)
from dockyard.runtime.substrate.tokens import TokenService
from dockyard.runtime.work.dispatch.records import (
    INTERRUPTED,
    RESULT_CAP,
    Board,
    Running,
    info,
    runner_identity,
    within_rate,
)
from dockyard.runtime.work.dispatch.routing import TEAM_MODES, Mode, check, check_host, consent_question, route
from dockyard.runtime.work.dispatch.run import DispatchRun
from dockyard.runtime.work.dispatch.states import CANCEL, INTERRUPT, accept_result, move
from dockyard.runtime.work.runners import Runners

__all__ = ["DispatchService"]

log = logging.getLogger(__name__)


class DispatchService:
    """Creates, waits on, cancels and lists dispatches; their runs are `DispatchRun`'s."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        audit: AuditLog,
        sandboxes: SandboxService,
        tokens: TokenService,
        runners: Runners,
    ) -> None:
        self._settings = settings
        self._budget = settings.results.budget_chars
        self._store = store
        self._audit = audit
        self._sandboxes = sandboxes
        self._tokens = tokens
        self._board = Board(store)
        self._runs = DispatchRun(settings, store, audit, sandboxes, tokens, runners, self._board)
        self._tg: anyio.abc.TaskGroup | None = None

    @property
    def on_change(self) -> Callable[[str, str], Awaitable[None]] | None:
        """Told the id and workspace of a dispatch whose state changed (the server wakes that
        workspace's subscribers with it)."""
        return self._board.on_change

    @on_change.setter
    def on_change(self, callback: Callable[[str, str], Awaitable[None]] | None) -> None:
        self._board.on_change = callback

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Mark what a crash interrupted, start what was queued, then hold the runs' tasks."""

        def recover(session: Session) -> tuple[list[tuple[Dispatch, str]], list[Dispatch]]:
            for row in session.exec(select(Dispatch).where(Dispatch.status == DispatchStatus.RUNNING)).all():
                move(row, INTERRUPT, finished_at=utcnow(), error=INTERRUPTED)
                session.add(row)
            session.flush()
            # Sandboxes a finished dispatch made and still holds (dockyard stopped before they were
            # given back: its remote sandbox, the shared or each member's of a team): they go
            # back to the pool now. A local dispatch's sandbox is its caller's and stays.
            held = (
                select(Dispatch, Sandbox.id)
                .join(
                    Sandbox, or_(col(Sandbox.id) == col(Dispatch.sandbox_id), col(Sandbox.run_id) == col(Dispatch.id))
                )
                .where(
                    col(Dispatch.status).in_(DispatchStatus.FINAL),
                    Dispatch.mode != Mode.LOCAL,
                    Sandbox.status == SandboxStatus.RUNNING,
                )
            )
            interrupted = list(session.exec(held).all())
            queued = list(session.exec(select(Dispatch).where(Dispatch.status == DispatchStatus.QUEUED)).all())
            return interrupted, queued

        interrupted, queued = await self._store.run(recover)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for row, sandbox_id in interrupted:
                tg.start_soon(self._free, row, sandbox_id)
            for row in queued:
                self._start(row)
            task_status.started()
            await anyio.sleep_forever()

    async def _free(self, row: Dispatch, sandbox_id: str) -> None:
        """Give back a sandbox a finished dispatch made and still holds."""
        try:
            await self._sandboxes.destroy(runner_identity(row), sandbox_id)
        except DockyardError as exc:
            log.info("sandbox %s of interrupted dispatch %s: %s", sandbox_id, row.id, exc)

    # -- dispatch ---------------------------------------------------------------------

    async def dispatch(
        self,
        who: Identity,
        *,
        mode: str,
        rationale: str,
        task_summary: str,
        prompt: str | None = None,
        runner: str | None = None,
        sandbox_id: str | None = None,
        members: list[str] | None = None,
        consent: str | None = None,
    ) -> DispatchInfo:
        """Record the decision and the dispatch, start it, and return at once.

        `consent` is the user's answer when the mode is `user_pc`: confirmed, declined,
        cancelled, or unavailable (the client cannot ask); anything but confirmed refuses it.
        """
        routed = route(mode, task_summary, prompt)
        used, hint = routed.mode, routed.hint
        decision = DispatchDecision(
            requested_mode=mode,
            used_mode=used,
            hint=hint,
            rationale=rationale,
            task_summary=task_summary,
            pool={
                p.template: {"warm": p.warm, "claimed": p.claimed, "max": p.max}
                for p in await pool_status(self._store, self._settings)
            },
            workspace_id=who.workspace_id,
            project_id=who.project_id,
            user_id=who.user_id,
            run_id=who.run_id,
            token_id=who.token_id,
            outcome="refused",
        )
        runner = runner or "script"

        async def refuse(exc: DockyardError) -> None:
            decision.reason = str(exc)
            await self._store.add(decision)
            await self._audit.append(
                who,
                Action.DISPATCH_CREATE,
                target=None,
                outcome="error",
                detail={
                    "mode": mode,
                    "used_mode": used,
                    "error": str(exc),
                    "token_id": who.token_id,
                    "consent": consent,
                },
            )

        try:
            check(self._settings, used, runner, prompt, sandbox_id, members)
            if used == Mode.USER_PC:
                check_host(self._settings, who, runner, consent)
            if used == Mode.LOCAL:
                assert sandbox_id is not None
                await self._sandboxes.check_owned(who, sandbox_id, Action.DISPATCH_CREATE)
        except DockyardError as exc:
            await refuse(exc)
            raise
        row = Dispatch(
            id=f"dsp_{secrets.token_hex(8)}",
            mode=used,
            requested_mode=mode,
            runner=runner,
            rationale=rationale,
            task_summary=task_summary,
            prompt=prompt,
            caller_sandbox_id=sandbox_id if used == Mode.LOCAL else None,
            members=list(members) if used in TEAM_MODES and members else None,
            workspace_id=who.workspace_id,
            project_id=who.project_id,
            user_id=who.user_id,
            run_id=who.run_id,
            token_id=who.token_id,
        )

        def insert(session: Session) -> None:
            # Counted in the insert's own transaction, so racing dispatches cannot overshoot.
            within_rate(session, who.workspace_id, self._settings.quotas.dispatches_per_minute)
            decision.dispatch_id, decision.outcome = row.id, "accepted"
            session.add(row)
            session.add(decision)
            link_run(session, row.id, who.run_id)  # a child of the caller's run: counted in its tree

        try:
            await self._store.run(insert)
        except QuotaExceededError as exc:
            decision.dispatch_id, decision.outcome = None, "refused"
            await refuse(exc)
            raise
        await self._audit.append(
            who,
            Action.DISPATCH_CREATE,
            target=row.id,
            outcome="ok",
            detail={
                "mode": used,
                "requested_mode": mode,
                "runner": runner,
                "hint": hint,
                "token_id": who.token_id,
                "consent": consent,
            },
        )
        self._start(row)
        return info(row, hint, self._budget)

    def consent_question(
        self, who: Identity, mode: str, task_summary: str, prompt: str | None, runner: str | None
    ) -> str | None:
        """What to ask the user before a `user_pc` dispatch, or None when it will not run on
        the host anyway (another mode, the mode off, or a caller or runner it refuses)."""
        return consent_question(self._settings, who, mode, task_summary, prompt, runner)

    def _start(self, row: Dispatch) -> None:
        assert self._tg is not None, "the dispatch service is not running"
        running = self._board.running.setdefault(row.id, Running())
        self._tg.start_soon(self._runs.execute, row, running)

    # -- results, waiting and cancelling ----------------------------------------------

    async def submit(self, who: Identity, dispatch_id: str, result: str, proof: str) -> DispatchInfo:
        """A runner's result, proven by the very token dockyard minted for this dispatch's run
        (DOCKYARD_TOKEN); accepted once.

        Any other proof (another run's token, a token naming this run that dockyard did not mint
        for it, a revoked one), a caller of another workspace, or a second submission is refused
        and audited.
        """
        await self._tokens.live(who, Action.DISPATCH_SUBMIT, dispatch_id)
        try:
            runner = await self._tokens.verify(proof)
        except DockyardError as exc:
            raise await self._tokens.deny(
                who, Action.DISPATCH_SUBMIT, f"the proof is not this run's token: {exc}", dispatch_id
            ) from exc
        row = await self._store.get(Dispatch, dispatch_id)
        if row is None or row.workspace_id != who.workspace_id:
            await self._tokens.deny(who, Action.DISPATCH_SUBMIT, "no such dispatch in the caller's reach", dispatch_id)
            raise NotFoundError(f"unknown dispatch '{dispatch_id}'; dispatch returns the ids you can wait on")
        if not hmac.compare_digest((row.run_token_id or "").encode(), (runner.token_id or "-").encode()):
            raise await self._tokens.deny(
                who,
                Action.DISPATCH_SUBMIT,
                "the proof is not the token dockyard minted for this dispatch's run",
                dispatch_id,
            )

        def accept(session: Session) -> None:
            row = session.get(Dispatch, dispatch_id)
            if row is None:
                raise StateError("the dispatch is not running")
            accept_result(row, result[-RESULT_CAP:])
            session.add(row)

        try:
            await self._store.run(accept)
        except StateError as exc:
            raise await self._tokens.deny(who, Action.DISPATCH_SUBMIT, str(exc), dispatch_id) from exc
        await self._audit.append(
            runner,
            Action.DISPATCH_SUBMIT,
            target=dispatch_id,
            outcome="ok",
            detail={"size": len(result), "token_id": runner.token_id},
        )
        row = await self._store.get(Dispatch, dispatch_id)
        assert row is not None
        return info(row, None, self._budget)

    async def get(self, who: Identity, dispatch_id: str, *, whole: bool = False) -> DispatchInfo:
        """The dispatch's state now: its texts cut to the result budget unless `whole`."""
        return info(await self._owned(who, dispatch_id), None, None if whole else self._budget)

    async def wait(
        self,
        who: Identity,
        dispatch_id: str,
        timeout_s: float,
        on_status: Callable[[str], Awaitable[None]] | None = None,
        on_output: OutputCallback | None = None,
    ) -> DispatchInfo:
        """The dispatch's state once it is final or `timeout_s` has passed (it keeps running);
        `on_status` hears each status it passes through meanwhile, `on_output` its runner's
        output (the latest few KiB first, then each chunk as it comes)."""
        row = await self._owned(who, dispatch_id)
        seen = row.status
        heard: Running | None = None
        try:
            with anyio.move_on_after(timeout_s):
                while row.status not in DispatchStatus.FINAL:
                    running = self._board.running.get(dispatch_id)
                    if running is not None and on_output is not None and running is not heard:
                        heard = running
                        await running.listen(on_output)
                    if running is None:
                        await anyio.sleep(0.05)  # between the row's insert and its task's start
                    else:
                        await running.changed.wait()
                    row = await self._owned(who, dispatch_id)
                    if on_status is not None and row.status != seen:
                        seen = row.status
                        await on_status(seen)
        finally:
            if heard is not None and on_output is not None:
                heard.listeners.discard(on_output)
        return info(await self._owned(who, dispatch_id), None, self._budget)

    async def cancel(self, who: Identity, dispatch_id: str) -> DispatchInfo:
        """Stop a dispatch's runner and free its runtime; a finished one stays as it ended.
        Another user's dispatch needs workspace:admin."""
        row = await self._owned(who, dispatch_id)
        await self._tokens.may_end(who, row.user_id, Action.DISPATCH_CANCEL, dispatch_id, "dispatch")
        if row.status not in DispatchStatus.FINAL:
            running = self._board.running.get(dispatch_id)
            if running is not None:
                running.scope.cancel()
                with anyio.fail_after(60):
                    while (row := await self._owned(who, dispatch_id)).status not in DispatchStatus.FINAL:
                        await anyio.sleep(0.05)
            else:
                row = await self._board.move(dispatch_id, CANCEL, error="cancelled by its owner", finished_at=utcnow())
        await self._audit.append(
            who,
            Action.DISPATCH_CANCEL,
            target=dispatch_id,
            outcome="ok",
            detail={"status": row.status, "token_id": who.token_id},
        )
        return info(row, None, self._budget)

    async def _owned(self, who: Identity, dispatch_id: str) -> Dispatch:
        row = await self._store.get(Dispatch, dispatch_id)
        if row is None or row.workspace_id != who.workspace_id:
            raise NotFoundError(f"unknown dispatch '{dispatch_id}'; dispatch returns the ids you can wait on")
        return row

    async def list_page(
        self, who: Identity, statuses: list[str] | None, limit: int, cursor: str | None
    ) -> DispatchPage:
        """A page of the dispatches in the caller's reach, newest first: its workspace's, or for
        a token bound to a sandbox (a runner, a member, a program in a sandbox) those of its own
        run and every run it started, else those that ran in that sandbox."""
        window = Window("dispatch_list", who, limit, cursor)

        def query(session: Session) -> list[Dispatch]:
            stmt = select(Dispatch).where(Dispatch.workspace_id == who.workspace_id)
            if who.sandbox_id is not None and who.run_id is not None:
                below = select(RunLink.run_id).where(RunLink.ancestor_id == who.run_id)
                stmt = stmt.where(or_(col(Dispatch.id) == who.run_id, col(Dispatch.id).in_(below)))
            elif who.sandbox_id is not None:
                stmt = stmt.where(
                    or_(Dispatch.sandbox_id == who.sandbox_id, Dispatch.caller_sandbox_id == who.sandbox_id)
                )
            if statuses:
                stmt = stmt.where(col(Dispatch.status).in_(statuses))
            return list(session.exec(window.apply(stmt, Dispatch)).all())

        rows, next_cursor = window.cut(await self._store.run(query))
        return DispatchPage(
            dispatches=[
                DispatchRow(
                    dispatch_id=row.id,
                    status=row.status,
                    mode=row.mode,
                    runner=row.runner,
                    task_summary=clip(row.task_summary),
                    user_id=row.user_id,
                    sandbox_id=row.sandbox_id or row.caller_sandbox_id,
                    created_at=row.created_at,
                    finished_at=row.finished_at,
                )
                for row in rows
            ],
            next_cursor=next_cursor,
        )

    async def decisions(self, who: Identity) -> list[DispatchDecision]:
        """The caller's workspace's dispatch decisions, oldest first."""
        return await self._store.run(
            lambda s: list(
                s.exec(
                    select(DispatchDecision)
                    .where(DispatchDecision.workspace_id == who.workspace_id)
                    .order_by(col(DispatchDecision.id))
                ).all()
            )
        )
