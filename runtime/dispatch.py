"""Dispatch: route a task to a mode, run it with a runner, and never lose its result.

A dispatch is a row from the moment `dispatch` returns (status queued). A background task runs
it: `remote` claims a fresh sandbox from the pool (the runner acts as a run of its own, with
the caller's attribution), `local` runs in the caller's own sandbox. The result is committed to
the store before anyone is told; `wait` reads the store. After a restart, dispatches that were
running are marked interrupted (never re-run behind the caller's back) and queued ones start.

Runners: `script` (the prompt is a bash script run as the sandbox user), `command` (a program
from the image, the prompt one argument) and `llm` (a tool-using loop on the server against a
chat endpoint, its tools acting in the sandbox). Team modes run one runner per member, in one
shared sandbox or each in its own, and synthesize the members' results into one. `user_pc` runs
on the machine dockyard runs on: refused unless config enables it, the caller holds
`dispatch:user_pc` and the user confirmed this very run.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import anyio
import anyio.abc
from sqlmodel import Session, col, func, or_, select

from dockyard.runtime.audit import AuditLog
from dockyard.runtime.errors import DockyardError, InvalidRequestError, NotFoundError, QuotaExceededError
from dockyard.runtime.hostrun import run_on_host
from dockyard.runtime.llmrunner import opening, run_llm, sandbox_tools
from dockyard.runtime.models import DispatchInfo
from dockyard.runtime.poolstatus import pool_status
from dockyard.runtime.provision import MEMBER_USERS
from dockyard.runtime.runs import link_run
from dockyard.runtime.sandboxes import SandboxService
from dockyard.runtime.settings import Identity, Settings
from dockyard.runtime.tokens import Minted, TokenService
from dockyard.runtime.store import Dispatch, DispatchDecision, DispatchStatus, Sandbox, SandboxStatus, Store, utcnow

__all__ = ["MODES", "DispatchService"]

log = logging.getLogger(__name__)

MODES = ("local", "remote", "team_single_vm", "team_multi_vm", "user_pc")
# What a runner's own token may do: work in sandboxes of its run, read dispatches.
_RUN_SCOPES = ["sandbox:exec", "sandbox:files", "dispatch:read"]
_TEAM_MODES = ("team_single_vm", "team_multi_vm")
_MAX_MEMBERS = 8
# Phrases in a task that decide its mode whatever the caller chose.
_HINTS = [
    (re.compile(r"\b(clean|fresh|isolated) (environment|sandbox|machine)\b", re.I), "remote"),
    (re.compile(r"\b(async|asynchronously|in the background)\b", re.I), "remote"),
    (re.compile(r"\buse (a|the) team\b|\bas a team\b", re.I), "team_multi_vm"),
]
_RESULT_CAP = 64 * 1024
_INTERRUPTED = "dockyard stopped while it ran; it was not re-run (dispatch it again if you want it)"


@dataclass
class _Running:
    """A dispatch's background task, for cancel and for waiters."""

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    changed: anyio.Event = field(default_factory=anyio.Event)


class _Done(Exception):
    """A team dispatch finished its own bookkeeping."""


class DispatchService:
    """Creates, runs, waits on and cancels dispatches."""

    def __init__(
        self, settings: Settings, store: Store, audit: AuditLog, sandboxes: SandboxService, tokens: TokenService
    ) -> None:
        self._settings = settings
        self._store = store
        self._audit = audit
        self._sandboxes = sandboxes
        self._tokens = tokens
        self._running: dict[str, _Running] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        # Told the id and workspace of a dispatch whose state changed (the server wakes that
        # workspace's subscribers with it).
        self.on_change: Callable[[str, str], Awaitable[None]] | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Mark what a crash interrupted, start what was queued, then hold the runs' tasks."""

        def recover(session: Session) -> tuple[list[tuple[Dispatch, str]], list[Dispatch]]:
            for row in session.exec(select(Dispatch).where(Dispatch.status == DispatchStatus.RUNNING)).all():
                row.status, row.finished_at, row.error = DispatchStatus.INTERRUPTED, utcnow(), _INTERRUPTED
                session.add(row)
            session.flush()
            # Sandboxes a finished dispatch made and still holds (dockyard stopped before they were
            # given back: its remote sandbox, the shared or each member's of a team): they go
            # back to the pool now. A local dispatch's sandbox is its caller's and stays.
            held = select(Dispatch, Sandbox.id).join(
                Sandbox, or_(col(Sandbox.id) == col(Dispatch.sandbox_id), col(Sandbox.run_id) == col(Dispatch.id))
            ).where(col(Dispatch.status).in_(DispatchStatus.FINAL), Dispatch.mode != "local", Sandbox.status == SandboxStatus.RUNNING)
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
            await self._sandboxes.destroy(_runner_identity(row), sandbox_id)
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
        used, hint = self.route(mode, task_summary, prompt)
        decision = DispatchDecision(
            requested_mode=mode,
            used_mode=used,
            hint=hint,
            rationale=rationale,
            task_summary=task_summary,
            pool={p.template: {"warm": p.warm, "claimed": p.claimed, "max": p.max} for p in await pool_status(self._store, self._settings)},
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
            await self._audit.append(who, "dispatch.create", target=None, outcome="error",
                                     detail={"mode": mode, "used_mode": used, "error": str(exc), "token_id": who.token_id,
                                         "consent": consent})

        try:
            self._check(used, runner, prompt, sandbox_id, members)
            if used == "user_pc":
                self._check_host(who, runner, consent)
            if used == "local":
                assert sandbox_id is not None
                await self._sandboxes.check_owned(who, sandbox_id, "dispatch.create")
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
            caller_sandbox_id=sandbox_id if used == "local" else None,
            members=list(members) if used in _TEAM_MODES and members else None,
            workspace_id=who.workspace_id,
            project_id=who.project_id,
            user_id=who.user_id,
            run_id=who.run_id,
            token_id=who.token_id,
        )

        def insert(session: Session) -> None:
            # Counted in the insert's own transaction, so racing dispatches cannot overshoot.
            _within_rate(session, who.workspace_id, self._settings.quotas.dispatches_per_minute)
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
        await self._audit.append(who, "dispatch.create", target=row.id, outcome="ok",
                                 detail={"mode": used, "requested_mode": mode, "runner": runner, "hint": hint, "token_id": who.token_id,
                                         "consent": consent})
        self._start(row)
        return _info(row, hint)

    def route(self, mode: str, task_summary: str, prompt: str | None) -> tuple[str, str | None]:
        """The mode a task runs in, and the hint that chose it when a phrase in the task
        overrode the caller's choice."""
        text = f"{task_summary}\n{prompt or ''}"
        for pattern, forced in _HINTS:
            if (found := pattern.search(text)) and forced != mode:
                return forced, f"the task says '{found.group(0)}', so it runs as {forced}"
        return mode, None

    def consent_question(self, who: Identity, mode: str, task_summary: str, prompt: str | None, runner: str | None) -> str | None:
        """What to ask the user before a `user_pc` dispatch, or None when it will not run on
        the host anyway (another mode, the mode off, or a caller or runner it refuses)."""
        used, _ = self.route(mode, task_summary, prompt)
        try:
            if used != "user_pc":
                return None
            self._check(used, runner or "script", prompt, None, None)
            self._check_host(who, runner or "script", "confirmed")
        except DockyardError:
            return None
        return (
            f"Run a task on this computer, outside any sandbox, as the user dockyard runs as, in {self._host_dir()}?\n"
            f"Task: {task_summary}\nRunner: {runner or 'script'}\n---\n{(prompt or '')[:2000]}"
        )

    def _check_host(self, who: Identity, runner: str, consent: str | None) -> None:
        """A `user_pc` dispatch runs only where config enables it, for a caller holding the
        scope, with a runner allowed on the host, and once the user confirmed it."""
        host = self._settings.dispatch.user_pc
        if not who.allows("dispatch:user_pc"):
            raise InvalidRequestError(
                "mode 'user_pc' needs the dispatch:user_pc scope, which this token does not hold; use 'remote'"
            )
        if runner not in host.runners or self._settings.runners[runner].kind == "llm":
            allowed = [name for name in host.runners if name in self._settings.runners and self._settings.runners[name].kind != "llm"]
            raise InvalidRequestError(f"runner '{runner}' may not run on the host; allowed there: {', '.join(allowed) or 'none'}")
        if consent != "confirmed":
            why = {
                "declined": "the user declined to run it on this computer",
                "cancelled": "the user dismissed the confirmation",
                "unavailable": "this client cannot ask the user to confirm it (it does not support elicitation)",
            }.get(consent or "", "it was not confirmed by the user")
            raise InvalidRequestError(f"mode 'user_pc' did not run: {why}; use 'remote' for an isolated runtime")

    def _host_dir(self) -> Path:
        return self._settings.dispatch.user_pc.workdir or Path.home()

    def _check(self, mode: str, runner: str, prompt: str | None, sandbox_id: str | None, members: list[str] | None) -> None:
        if mode not in MODES:
            raise InvalidRequestError(f"unknown mode '{mode}'; allowed: {', '.join(MODES)}")
        if mode == "user_pc" and not self._settings.dispatch.user_pc.enabled:
            raise InvalidRequestError(
                "mode 'user_pc' (the machine dockyard runs on) is off on this server; use 'remote' for an isolated runtime"
            )
        if mode in _TEAM_MODES and not members:
            raise InvalidRequestError(f"mode '{mode}' needs members: one prompt (for the script runner, a script) per member")
        if members and len(members) > _MAX_MEMBERS:
            raise InvalidRequestError(f"at most {_MAX_MEMBERS} members; got {len(members)}")
        profiles = self._settings.runners
        if runner not in profiles:
            raise InvalidRequestError(f"unknown runner '{runner}'; allowed: {', '.join(sorted(profiles))}")
        if mode not in _TEAM_MODES and (not prompt or not prompt.strip()):
            raise InvalidRequestError(f"runner '{runner}' needs a prompt: the script to run, or the task for the command")
        if mode == "local" and not sandbox_id:
            raise InvalidRequestError("mode 'local' runs in your current sandbox: give its sandbox_id")

    def _start(self, row: Dispatch) -> None:
        assert self._tg is not None, "the dispatch service is not running"
        running = self._running.setdefault(row.id, _Running())
        self._tg.start_soon(self._work, row, running)

    # -- running ----------------------------------------------------------------------

    async def _work(self, row: Dispatch, running: _Running) -> None:
        owner = _runner_identity(row)
        status, result, error = DispatchStatus.FAILED, None, None
        made: str | None = None
        begun: int | None = None
        with running.scope:
            try:
                # On the record before it runs: if dockyard dies mid-run, the next start marks it interrupted.
                begun = (await self._audit.append(owner, "dispatch.run", target=row.id, outcome="started",
                                                  detail={"mode": row.mode, "runner": row.runner})).id
                if row.mode == "user_pc":
                    status, result, error = await self._on_host(row, owner)
                    raise _Done
                if row.mode in _TEAM_MODES:
                    await self._set(row.id, status=DispatchStatus.RUNNING, started_at=utcnow())
                    made_many: list[str] = []
                    try:
                        status, result, error = await self._team(row, owner, made_many)
                    finally:
                        with anyio.CancelScope(shield=True):
                            for sandbox in made_many:
                                await self._give_back(owner, row.id, sandbox)
                    raise _Done
                if row.mode == "local":
                    sandbox_id = row.caller_sandbox_id
                else:  # it stays queued until the pool serves it
                    made = sandbox_id = (await self._sandboxes.create(owner)).sandbox_id
                await self._set(row.id, status=DispatchStatus.RUNNING, started_at=utcnow(), sandbox_id=sandbox_id)
                assert sandbox_id is not None and row.prompt is not None
                profile = self._settings.runners[row.runner]
                timeout = min(profile.timeout_s, self._settings.sandbox.exec_max_timeout_s)
                work: str | list[str] = row.prompt
                if profile.kind == "command":  # the prompt is one argument, never shell text
                    work = [arg.replace("{prompt}", row.prompt) for arg in profile.argv]
                token = await self._run_token(row, owner, _RUN_SCOPES, timeout, sandbox_id)
                env = _runner_env(row, token.token)
                if profile.kind == "llm":
                    with anyio.fail_after(timeout):
                        result = (await run_llm(profile, opening(row.prompt), sandbox_tools(self._sandboxes, owner, sandbox_id, env)))[-_RESULT_CAP:]
                    status = DispatchStatus.COMPLETED
                else:
                    ran = await self._sandboxes.exec(owner, sandbox_id, work, timeout_s=timeout, runner_env=env)
                    result = ran.stdout[-_RESULT_CAP:]
                    if ran.timed_out:
                        error = f"the runner timed out after {timeout} s"
                    elif ran.exit_code != 0:
                        error = f"the runner exited with code {ran.exit_code}: {ran.stderr.strip()[-2000:]}"
                    else:
                        status = DispatchStatus.COMPLETED
            except _Done:
                pass
            except TimeoutError:
                error = f"the runner did not finish within {self._settings.runners[row.runner].timeout_s} s"
            except DockyardError as exc:
                error = str(exc)
            except anyio.get_cancelled_exc_class():
                if not running.scope.cancel_called:  # dockyard itself is stopping
                    with anyio.CancelScope(shield=True):
                        stored = await self._store.get(Dispatch, row.id)
                        if stored is not None and stored.status == DispatchStatus.QUEUED:
                            raise  # it never ran: it starts again with dockyard
                        status, error = DispatchStatus.INTERRUPTED, _INTERRUPTED
                        made = None  # its sandbox is freed at the next start, with the store's record
                        await self._set(row.id, status=status, error=error, finished_at=utcnow())
                    raise
        if running.scope.cancel_called:
            status, error = DispatchStatus.CANCELLED, "cancelled by its owner"
        with anyio.CancelScope(shield=True):
            stored = await self._store.get(Dispatch, row.id)
            if stored is not None and stored.submitted:
                result = stored.result  # what the runner submitted is its result
            # The result is in the store before anyone can be told of it. The status turns final
            # once the run's token is revoked and its sandbox given back, so whoever sees it
            # final finds them so.
            await self._set(row.id, notify=False, result=result, error=error)
            await self._tokens.revoke_run(row.id, f"its dispatch ended ({status})")
            if made is not None:
                await self._give_back(owner, row.id, made)
            await self._set(row.id, status=status, finished_at=utcnow())
            await self._audit.append(owner, "dispatch.finish", target=row.id, outcome="ok" if status == DispatchStatus.COMPLETED else "error",
                                     detail={"status": status, "error": error, "started_id": begun})
            running.changed.set()
            self._running.pop(row.id, None)

    async def _on_host(self, row: Dispatch, owner: Identity) -> tuple[str, str | None, str | None]:
        """Run a confirmed `user_pc` dispatch on this machine, with its run's token."""
        await self._set(row.id, status=DispatchStatus.RUNNING, started_at=utcnow())
        assert row.prompt is not None
        profile = self._settings.runners[row.runner]
        argv = ["bash", "-c", row.prompt] if profile.kind == "script" else [a.replace("{prompt}", row.prompt) for a in profile.argv]
        token = await self._run_token(row, owner, ["dispatch:read"], profile.timeout_s, None)
        ran = await run_on_host(argv, cwd=self._host_dir(), env=_runner_env(row, token.token), timeout_s=profile.timeout_s,
                                cap=self._settings.sandbox.output_cap_bytes)
        if ran.timed_out:
            return DispatchStatus.FAILED, ran.stdout[-_RESULT_CAP:], f"the runner timed out after {profile.timeout_s} s"
        if ran.exit_code != 0:
            return DispatchStatus.FAILED, ran.stdout[-_RESULT_CAP:], f"the runner exited with code {ran.exit_code}: {ran.stderr.strip()[-2000:]}"
        return DispatchStatus.COMPLETED, ran.stdout[-_RESULT_CAP:], None

    async def _run_token(self, row: Dispatch, owner: Identity, scopes: list[str], timeout_s: int, sandbox_id: str | None) -> Minted:
        """The run's own token, minted from the token that created the dispatch (revoking that
        one revokes this), and recorded as the only proof `submit` accepts for this dispatch."""
        token = await self._tokens.mint_for_run(
            owner, row.id, scopes, utcnow() + timedelta(seconds=timeout_s + 60), sandbox_id, parent_id=row.token_id
        )
        await self._set(row.id, notify=False, run_token_id=token.token_id)
        return token

    async def _give_back(self, owner: Identity, dispatch_id: str, sandbox_id: str) -> None:
        try:
            await self._sandboxes.destroy(owner, sandbox_id)
        except (DockyardError, RuntimeError) as exc:  # RuntimeError: dockyard is stopping
            log.warning("could not give back sandbox %s of dispatch %s now (%s)", sandbox_id, dispatch_id, exc)

    async def _team(self, row: Dispatch, owner: Identity, made: list[str]) -> tuple[str, str | None, str | None]:
        """Run every member (sharing one sandbox, or each in its own), then synthesize: the
        final result holds each member's, in order; it fails if any member failed."""
        assert row.members
        shared = (await self._sandboxes.create(owner)).sandbox_id if row.mode == "team_single_vm" else None
        if shared:
            made.append(shared)
        await self._set(row.id, sandbox_id=shared)
        outcomes: list[dict] = [{} for _ in row.members]
        profile = self._settings.runners[row.runner]
        timeout = min(profile.timeout_s, self._settings.sandbox.exec_max_timeout_s)

        async def member(index: int, prompt: str) -> None:
            # Members sharing the sandbox run each as a user of their own there (m1, m2, ...).
            run_as = MEMBER_USERS[index] if shared else None
            try:
                sandbox_id = shared
                if sandbox_id is None:
                    sandbox_id = (await self._sandboxes.create(owner)).sandbox_id
                    made.append(sandbox_id)
                work: str | list[str] = prompt
                if profile.kind == "command":
                    work = [arg.replace("{prompt}", prompt) for arg in profile.argv]
                if profile.kind == "llm":
                    with anyio.fail_after(timeout):
                        text = await run_llm(profile, opening(prompt), sandbox_tools(self._sandboxes, owner, sandbox_id, {}, run_as))
                    outcomes[index] = {"member": index, "sandbox_id": sandbox_id, "status": "completed", "result": text}
                    return
                ran = await self._sandboxes.exec(owner, sandbox_id, work, timeout_s=timeout, run_as=run_as)
                ok = ran.exit_code == 0 and not ran.timed_out
                outcomes[index] = {
                    "member": index, "sandbox_id": sandbox_id, "status": "completed" if ok else "failed",
                    "result": ran.stdout[-_RESULT_CAP:], "error": None if ok else f"exit code {ran.exit_code}: {ran.stderr.strip()[-500:]}",
                }
            except (DockyardError, TimeoutError) as exc:
                outcomes[index] = {"member": index, "status": "failed", "result": None, "error": str(exc) or "timed out"}

        async with anyio.create_task_group() as tg:
            for index, prompt in enumerate(row.members):
                tg.start_soon(member, index, prompt)
        await self._set(row.id, member_results=outcomes)
        synthesis = "\n".join(f"[member {o['member']}] {(o.get('result') or '').strip()}" for o in outcomes) + "\n"
        failed = [o for o in outcomes if o["status"] != "completed"]
        if failed:
            reasons = "; ".join(f"member {o['member']}: {o['error']}" for o in failed)
            return DispatchStatus.FAILED, synthesis, f"{len(failed)} of {len(outcomes)} members failed: {reasons}"
        return DispatchStatus.COMPLETED, synthesis, None

    async def _set(self, dispatch_id: str, notify: bool = True, **values: object) -> None:
        updated = await self._store.update(Dispatch, dispatch_id, **values)
        assert updated is not None
        if not notify:
            return
        if (running := self._running.get(dispatch_id)) is not None:
            running.changed.set()
            running.changed = anyio.Event()
        if self.on_change is not None:
            try:
                await self.on_change(dispatch_id, updated.workspace_id)
            except Exception:  # a subscriber's trouble must not stop the dispatch
                log.exception("dispatch %s: change notification failed", dispatch_id)

    # -- waiting and cancelling -------------------------------------------------------

    async def submit(self, who: Identity, dispatch_id: str, result: str, proof: str) -> DispatchInfo:
        """A runner's result, proven by the very token dockyard minted for this dispatch's run
        (DOCKYARD_TOKEN); accepted once.

        Any other proof (another run's token, a token naming this run that dockyard did not mint
        for it, a revoked one), a caller of another workspace, or a second submission is refused
        and audited.
        """
        await self._tokens.live(who, "dispatch.submit", dispatch_id)
        try:
            runner = await self._tokens.verify(proof)
        except DockyardError as exc:
            raise await self._tokens.deny(who, "dispatch.submit", f"the proof is not this run's token: {exc}", dispatch_id) from exc
        row = await self._store.get(Dispatch, dispatch_id)
        if row is None or row.workspace_id != who.workspace_id:
            await self._tokens.deny(who, "dispatch.submit", "no such dispatch in the caller's reach", dispatch_id)
            raise NotFoundError(f"unknown dispatch '{dispatch_id}'; dispatch returns the ids you can wait on")
        if not hmac.compare_digest((row.run_token_id or "").encode(), (runner.token_id or "-").encode()):
            raise await self._tokens.deny(who, "dispatch.submit", "the proof is not the token dockyard minted for this dispatch's run",
                                          dispatch_id)

        def accept(session: Session) -> str | None:
            row = session.get(Dispatch, dispatch_id)
            if row is None or row.status != DispatchStatus.RUNNING:
                return "the dispatch is not running"
            if row.submitted:
                return "a result was already submitted for this dispatch"
            row.result, row.submitted = result[-_RESULT_CAP:], True
            session.add(row)
            return None

        refusal = await self._store.run(accept)
        if refusal is not None:
            raise await self._tokens.deny(who, "dispatch.submit", refusal, dispatch_id)
        await self._audit.append(runner, "dispatch.submit", target=dispatch_id, outcome="ok",
                                 detail={"size": len(result), "token_id": runner.token_id})
        row = await self._store.get(Dispatch, dispatch_id)
        assert row is not None
        return _info(row, None)

    async def get(self, who: Identity, dispatch_id: str) -> DispatchInfo:
        """The dispatch's state now."""
        return _info(await self._owned(who, dispatch_id), None)

    async def wait(
        self,
        who: Identity,
        dispatch_id: str,
        timeout_s: float,
        on_status: Callable[[str], Awaitable[None]] | None = None,
    ) -> DispatchInfo:
        """The dispatch's state once it is final or `timeout_s` has passed (it keeps running);
        `on_status` hears each status it passes through meanwhile."""
        row = await self._owned(who, dispatch_id)
        seen = row.status
        with anyio.move_on_after(timeout_s):
            while row.status not in DispatchStatus.FINAL:
                running = self._running.get(dispatch_id)
                if running is None:
                    await anyio.sleep(0.05)  # between the row's insert and its task's start
                else:
                    await running.changed.wait()
                row = await self._owned(who, dispatch_id)
                if on_status is not None and row.status != seen:
                    seen = row.status
                    await on_status(seen)
        return _info(await self._owned(who, dispatch_id), None)

    async def cancel(self, who: Identity, dispatch_id: str) -> DispatchInfo:
        """Stop a dispatch's runner and free its runtime; a finished one stays as it ended.
        Another user's dispatch needs workspace:admin."""
        row = await self._owned(who, dispatch_id)
        await self._tokens.may_end(who, row.user_id, "dispatch.cancel", dispatch_id, "dispatch")
        if row.status not in DispatchStatus.FINAL:
            running = self._running.get(dispatch_id)
            if running is not None:
                running.scope.cancel()
                with anyio.fail_after(60):
                    while (row := await self._owned(who, dispatch_id)).status not in DispatchStatus.FINAL:
                        await anyio.sleep(0.05)
            else:
                await self._set(dispatch_id, status=DispatchStatus.CANCELLED, error="cancelled by its owner", finished_at=utcnow())
                row = await self._owned(who, dispatch_id)
        await self._audit.append(who, "dispatch.cancel", target=dispatch_id, outcome="ok",
                                 detail={"status": row.status, "token_id": who.token_id})
        return _info(row, None)

    async def _owned(self, who: Identity, dispatch_id: str) -> Dispatch:
        row = await self._store.get(Dispatch, dispatch_id)
        if row is None or row.workspace_id != who.workspace_id:
            raise NotFoundError(f"unknown dispatch '{dispatch_id}'; dispatch returns the ids you can wait on")
        return row

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


def _info(row: Dispatch, hint: str | None) -> DispatchInfo:
    final = row.status in DispatchStatus.FINAL
    return DispatchInfo(
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
        next_steps=None if final else f"call await_dispatch(dispatch_id='{row.id}') to collect the result; it keeps running meanwhile",
    )


def _within_rate(session: Session, workspace_id: str, per_minute: int) -> None:
    """Refuse one more dispatch of a workspace that started `per_minute` in the last 60 s (0: no limit)."""
    if not per_minute:
        return
    since = utcnow() - timedelta(seconds=60)
    started = session.exec(
        select(func.count()).select_from(Dispatch).where(Dispatch.workspace_id == workspace_id, col(Dispatch.created_at) >= since)
    ).one()
    if started >= per_minute:
        raise QuotaExceededError(
            f"quota dispatches_per_minute reached: workspace '{workspace_id}' started {started} dispatches in the last "
            f"60 s and the limit is {per_minute}; wait before dispatching again, or ask the operator for a higher quota"
        )


def _runner_identity(row: Dispatch) -> Identity:
    """What a dispatch's runner acts as: its caller's attribution, as a run of its own."""
    return Identity(
        workspace_id=row.workspace_id,
        project_id=row.project_id,
        user_id=row.user_id,
        run_id=row.id,
        scopes=["sandbox:create", *_RUN_SCOPES],
    )


def _runner_env(row: Dispatch, token: str) -> dict[str, str]:
    """The attribution a runner sees, and its run's token (never an admin or tenant key)."""
    return {
        "DOCKYARD_WORKSPACE_ID": row.workspace_id,
        "DOCKYARD_PROJECT_ID": row.project_id,
        "DOCKYARD_USER_ID": row.user_id,
        "DOCKYARD_RUN_ID": row.id,
        "DOCKYARD_DISPATCH_ID": row.id,
        "DOCKYARD_TOKEN": token,
    }
