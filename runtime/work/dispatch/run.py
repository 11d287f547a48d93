"""Running one dispatch: its runtime, its runner (through the runner core), and its end.

`remote` claims a fresh sandbox from the pool (the runner acts as a run of its own, with the
caller's attribution), `local` runs in the caller's own sandbox, the team modes run one runner
per member (in one shared sandbox, each member as a user of its own there, or each in its own
sandbox) and put the members' results together, and `user_pc` runs on this machine. The
result is committed to the store before the status turns final; the status turns final once
the run's token is revoked and the sandboxes it made are given back, so whoever sees it final
finds them so. If dockyard stops mid-run the dispatch is marked interrupted and its sandboxes
are given back at the next start; one that was still queued starts again then.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import NotRequired, TypedDict

import anyio
from sqlmodel import Session

from dockyard.runtime.runtimes.provision import MEMBER_USERS
from dockyard.runtime.runtimes.sandboxes import SandboxService
from dockyard.runtime.substrate.actions import Action, Scope
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.errors import DockyardError
from dockyard.runtime.substrate.settings import Identity, RunnerProfile, Settings
from dockyard.runtime.substrate.store import Dispatch, DispatchStatus, Store, utcnow
from dockyard.runtime.substrate.tokens import Minted, TokenService
from dockyard.runtime.work.dispatch.records import (
    INTERRUPTED,
    RESULT_CAP,
    RUN_SCOPES,
    Board,
    Running,
    runner_env,
    runner_identity,
)
from dockyard.runtime.work.dispatch.routing import TEAM_MODES, Mode, host_dir
from dockyard.runtime.work.dispatch.states import INTERRUPT, START, move
from dockyard.runtime.work.runners import InSandbox, Job, OnHost, OutputCallback, Runners, RunResult

__all__ = ["DispatchRun", "Ended"]

log = logging.getLogger(__name__)


class _MemberOutcome(TypedDict):
    """One member's end in a team dispatch, as stored in its `member_results` and shown to its caller."""

    member: int
    sandbox_id: NotRequired[str]  # absent when the member raised instead of ending with an exit code
    status: str
    result: str | None
    error: str | None


@dataclass(frozen=True)
class Ended:
    """How a dispatch's work ended: its final status, result and error."""

    status: DispatchStatus
    result: str | None = None
    error: str | None = None

    @classmethod
    def of(cls, ran: RunResult, timeout_s: int) -> Ended:
        """The end of a dispatch whose work was one run."""
        result = ran.output[-RESULT_CAP:]
        if ran.timed_out:
            return cls(DispatchStatus.FAILED, result, f"the runner timed out after {timeout_s} s")
        if ran.exit_code != 0:
            return cls(
                DispatchStatus.FAILED,
                result,
                f"the runner exited with code {ran.exit_code}: {ran.stderr.strip()[-2000:]}",
            )
        return cls(DispatchStatus.COMPLETED, result)


class DispatchRun:
    """Executes dispatches, each in the task the dispatch service started for it."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        audit: AuditLog,
        sandboxes: SandboxService,
        tokens: TokenService,
        runners: Runners,
        board: Board,
    ) -> None:
        self._settings = settings
        self._store = store
        self._audit = audit
        self._sandboxes = sandboxes
        self._tokens = tokens
        self._board = board
        self._runners = runners

    async def execute(self, row: Dispatch, running: Running) -> None:
        """Run `row` to its end, its owner's cancel (`running.scope`) or dockyard's stop."""
        stored = await self._store.get(Dispatch, row.id)
        if stored is None or stored.status != DispatchStatus.QUEUED:  # cancelled before its task began
            running.changed.set()
            self._board.running.pop(row.id, None)
            return
        owner = runner_identity(row)
        ended = Ended(DispatchStatus.FAILED)
        made: list[str] = []  # the sandboxes this run created: given back when it ends
        begun: int | None = None
        with running.scope:
            try:
                # On the record before it runs: if dockyard dies mid-run, the next start marks it interrupted.
                begun = (
                    await self._audit.append(
                        owner,
                        Action.DISPATCH_RUN,
                        target=row.id,
                        outcome="started",
                        detail={"mode": row.mode, "runner": row.runner},
                    )
                ).id
                ended = await self._work(row, owner, made, running)
            except TimeoutError:
                ended = Ended(
                    DispatchStatus.FAILED, error=f"the runner did not finish within {self._profile(row).timeout_s} s"
                )
            except DockyardError as exc:
                ended = Ended(DispatchStatus.FAILED, error=str(exc))
            except anyio.get_cancelled_exc_class():
                if not running.scope.cancel_called:  # dockyard itself is stopping
                    with anyio.CancelScope(shield=True):
                        await self._board.change(_interrupt(row.id))
                    raise
        if running.scope.cancel_called:
            ended = Ended(DispatchStatus.CANCELLED, ended.result, "cancelled by its owner")
        with anyio.CancelScope(shield=True):
            try:
                await self._finish(row, owner, ended, made, begun)
            finally:
                running.changed.set()
                self._board.running.pop(row.id, None)

    async def _work(self, row: Dispatch, owner: Identity, made: list[str], running: Running) -> Ended:
        if row.mode == Mode.USER_PC:
            return await self._on_host(row, owner, running)
        if row.mode in TEAM_MODES:
            return await self._team(row, owner, made, running)
        return await self._in_sandbox(row, owner, made, running)

    async def _in_sandbox(self, row: Dispatch, owner: Identity, made: list[str], running: Running) -> Ended:
        """Run a `local` or `remote` dispatch in its sandbox, with its run's token."""
        if row.mode == Mode.LOCAL:
            sandbox_id = row.caller_sandbox_id
        else:  # it stays queued until the pool serves it
            sandbox_id = (await self._sandboxes.create(owner)).sandbox_id
            made.append(sandbox_id)
        await self._board.move(row.id, START, started_at=utcnow(), sandbox_id=sandbox_id)
        assert sandbox_id is not None and row.prompt is not None
        profile = self._profile(row)
        timeout = min(profile.timeout_s, self._settings.sandbox.exec_max_timeout_s)
        token = await self._run_token(row, owner, RUN_SCOPES, timeout, sandbox_id)
        job = Job(
            profile,
            row.prompt,
            owner,
            InSandbox(sandbox_id),
            timeout,
            env=runner_env(row, token.token),
            on_output=running.output,
        )
        return Ended.of(await self._runners.run(job), timeout)

    async def _on_host(self, row: Dispatch, owner: Identity, running: Running) -> Ended:
        """Run a confirmed `user_pc` dispatch on this machine, with its run's token."""
        await self._board.move(row.id, START, started_at=utcnow())
        assert row.prompt is not None
        profile = self._profile(row)
        token = await self._run_token(row, owner, [Scope.DISPATCH_READ], profile.timeout_s, None)
        job = Job(
            profile,
            row.prompt,
            owner,
            OnHost(host_dir(self._settings)),
            profile.timeout_s,
            env=runner_env(row, token.token),
            on_output=running.output,
        )
        return Ended.of(await self._runners.run(job), profile.timeout_s)

    async def _team(self, row: Dispatch, owner: Identity, made: list[str], running: Running) -> Ended:
        """Run every member (sharing one sandbox, or each in its own), then put their results
        together: the final result holds each member's, in order; it fails if any member failed."""
        assert row.members
        await self._board.move(row.id, START, started_at=utcnow())
        shared = (await self._sandboxes.create(owner)).sandbox_id if row.mode == Mode.TEAM_SINGLE_VM else None
        if shared:
            made.append(shared)
        await self._board.write(row.id, sandbox_id=shared)
        by_member: dict[int, _MemberOutcome] = {}  # every member's task sets its own, or the group raises
        profile = self._profile(row)
        timeout = min(profile.timeout_s, self._settings.sandbox.exec_max_timeout_s)

        async def member(index: int, prompt: str) -> None:
            # Members sharing the sandbox run each as a user of their own there (m1, m2, ...).
            run_as = MEMBER_USERS[index] if shared else None
            try:
                sandbox_id = shared
                if sandbox_id is None:
                    sandbox_id = (await self._sandboxes.create(owner)).sandbox_id
                    made.append(sandbox_id)
                job = Job(
                    profile, prompt, owner, InSandbox(sandbox_id, run_as), timeout, on_output=_labelled(running, index)
                )
                ran = await self._runners.run(job)
                by_member[index] = {
                    "member": index,
                    "sandbox_id": sandbox_id,
                    "status": "completed" if ran.is_ok else "failed",
                    "result": ran.output[-RESULT_CAP:],
                    "error": None if ran.is_ok else f"exit code {ran.exit_code}: {ran.stderr.strip()[-500:]}",
                }
            except (DockyardError, TimeoutError) as exc:
                by_member[index] = {
                    "member": index,
                    "status": "failed",
                    "result": None,
                    "error": str(exc) or "timed out",
                }

        async with anyio.create_task_group() as tg:
            for index, prompt in enumerate(row.members):
                tg.start_soon(member, index, prompt)
        outcomes = [by_member[index] for index in range(len(row.members))]
        await self._board.write(row.id, member_results=outcomes)
        together = "\n".join(f"[member {o['member']}] {(o.get('result') or '').strip()}" for o in outcomes) + "\n"
        failed = [o for o in outcomes if o["status"] != "completed"]
        if failed:
            reasons = "; ".join(f"member {o['member']}: {o['error']}" for o in failed)
            return Ended(DispatchStatus.FAILED, together, f"{len(failed)} of {len(outcomes)} members failed: {reasons}")
        return Ended(DispatchStatus.COMPLETED, together)

    async def _finish(self, row: Dispatch, owner: Identity, ended: Ended, made: list[str], begun: int | None) -> None:
        """Commit the result, revoke the run's token, give back its sandboxes, then end it."""
        result = ended.result
        stored = await self._store.get(Dispatch, row.id)
        if stored is not None and stored.submitted:
            result = stored.result  # what the runner submitted is its result
        await self._board.write(row.id, notify=False, result=result, error=ended.error)
        await self._tokens.revoke_run(row.id, f"its dispatch ended ({ended.status})")
        for sandbox_id in made:
            await self._give_back(owner, row.id, sandbox_id)
        await self._board.move(row.id, ended.status, finished_at=utcnow())
        await self._audit.append(
            owner,
            Action.DISPATCH_FINISH,
            target=row.id,
            outcome="ok" if ended.status == DispatchStatus.COMPLETED else "error",
            detail={"status": ended.status, "error": ended.error, "started_id": begun},
        )

    async def _run_token(
        self, row: Dispatch, owner: Identity, scopes: Sequence[Scope], timeout_s: int, sandbox_id: str | None
    ) -> Minted:
        """The run's own token, minted from the token that created the dispatch (revoking that
        one revokes this), and recorded as the only proof `submit` accepts for this dispatch."""
        token = await self._tokens.mint_for_run(
            owner, row.id, scopes, utcnow() + timedelta(seconds=timeout_s + 60), sandbox_id, parent_id=row.token_id
        )
        await self._board.write(row.id, notify=False, run_token_id=token.token_id)
        return token

    async def _give_back(self, owner: Identity, dispatch_id: str, sandbox_id: str) -> None:
        try:
            await self._sandboxes.destroy(owner, sandbox_id)
        except DockyardError as exc:
            log.warning("could not give back sandbox %s of dispatch %s now (%s)", sandbox_id, dispatch_id, exc)

    def _profile(self, row: Dispatch) -> RunnerProfile:
        return self._settings.runners[row.runner]


def _labelled(running: Running, member: int) -> OutputCallback:
    """A team member's output for the dispatch's listeners, each of its lines led by `[member N] `."""
    line_start = {"stdout": True, "stderr": True}

    async def output(stream: str, text: str) -> None:
        lines = text.splitlines(keepends=True)
        shown = "".join(
            f"[member {member}] {line}" if i or line_start[stream] else line for i, line in enumerate(lines)
        )
        line_start[stream] = text.endswith("\n")
        await running.output(stream, shown)

    return output


def _interrupt(dispatch_id: str) -> Callable[[Session], Dispatch | None]:
    """A store step for a dispatch whose run dockyard's stop cut short: a running one is
    interrupted (its sandboxes are given back at the next start, never re-run); a queued one
    never ran, and stays queued to start again with dockyard."""

    def write(session: Session) -> Dispatch | None:
        row = session.get(Dispatch, dispatch_id)
        if row is None or row.status == DispatchStatus.QUEUED:
            return None
        move(row, INTERRUPT, error=INTERRUPTED, finished_at=utcnow())
        session.add(row)
        return row

    return write
