"""The member loop: each member takes a turn whenever there is work for it, else sleeps until a
message rings its bell.

A member's first turn works on the prompt it was spawned with; each later turn works on every
message that arrived meanwhile, and when it ends those messages count as delivered. Before a
turn the member gets its sandbox (its own, or a seat in the team's shared one) and a token for
its state: a member in plan mode works with the team tools alone until its plan is approved.
`_run` hands each turn to the runner core (`dockyard.runtime.work.runners`), as dispatch does.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio
import anyio.abc
from sqlmodel import Session, select

from dockyard.runtime.runtimes.provision import MEMBER_USERS
from dockyard.runtime.runtimes.sandboxes import SandboxService
from dockyard.runtime.substrate.actions import Action, Scope
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.errors import DockyardError, InvalidRequestError, StateError
from dockyard.runtime.substrate.settings import Identity, Settings
from dockyard.runtime.substrate.store import Member, Message, PlanStatus, Store, Team, Token, utcnow
from dockyard.runtime.substrate.tokens import TokenService
from dockyard.runtime.work.runners import InSandbox, Job, LlmTools, Runners, SandboxTools, opening
from dockyard.runtime.work.teams.access import INBOX, TEAM, TeamAccess, owner, run_of, team_owner
from dockyard.runtime.work.teams.membertools import MEMBER_TOOLS, PLAN_BLOCKED, TEAM_TOOLS, TeamTools, call_team_tool
from dockyard.runtime.work.teams.messaging import INBOX_DIR, Messaging
from dockyard.runtime.work.teams.states import (
    BEGIN_TURN,
    FAIL_MEMBER,
    LIVE_MEMBER,
    PREPARE_MEMBER,
    REST_MEMBER,
    Transition,
)
from dockyard.runtime.work.teams.views import as_text, wire

__all__ = ["MemberLoop"]

log = logging.getLogger(__name__)

# A member's token: the team tools, work in its own sandbox, and helpers it may dispatch.
_MEMBER_SCOPES = [
    Scope.TEAM_MEMBER,
    Scope.SANDBOX_EXEC,
    Scope.SANDBOX_FILES,
    Scope.DISPATCH_CREATE,
    Scope.DISPATCH_READ,
]
# Until the lead approves its plan, a member in plan mode may only use the team tools.
_PLANNING_SCOPES = [Scope.TEAM_MEMBER]
_OUTPUT_CAP = 64 * 1024


@dataclass
class _Live:
    """A member's running loop, for stopping it, and the token its turns act with."""

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    ended: anyio.Event = field(default_factory=anyio.Event)
    token: str | None = None  # its current token, handed to each turn
    token_id: str | None = None
    scopes: list[str] = field(default_factory=list)  # what that token may do
    planning: bool = False  # that token was minted before the member's plan was approved


class MemberLoop:
    """Runs every member's loop of turns in one task group, and stops them."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        audit: AuditLog,
        sandboxes: SandboxService,
        runners: Runners,
        tokens: TokenService,
        access: TeamAccess,
        messaging: Messaging,
        tools: TeamTools,
    ) -> None:
        self._settings = settings
        self._store = store
        self._audit = audit
        self._sandboxes = sandboxes
        self._runners = runners
        self._tokens = tokens
        self._access = access
        self._messaging = messaging
        self._tools = tools
        self._live: dict[str, _Live] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._team_locks: dict[str, anyio.Lock] = {}

    async def run(self, members: list[tuple[Member, bool]], *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Start the loops of `members` (each with whether it waits for a message first), then
        hold every loop started from now on."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for member, wait_first in members:
                self.start(member, wait_first=wait_first)
            task_status.started()
            await anyio.sleep_forever()

    def start(self, member: Member, *, wait_first: bool) -> None:
        """Start a member's loop in the background."""
        assert self._tg is not None, "the team service is not running"
        live = self._live.setdefault(member.id, _Live())
        self._messaging.bells.current(member.id)  # what arrives before the loop runs still wakes it
        self._tg.start_soon(self._loop, member.id, live, wait_first)

    async def stop(self, member_ids: list[str]) -> None:
        """Stop members' loops (a running turn is killed) and wait until they have ended."""
        for member_id in member_ids:
            if (live := self._live.get(member_id)) is not None:
                live.scope.cancel()
        for member_id in member_ids:
            if (live := self._live.pop(member_id, None)) is not None:
                with anyio.fail_after(60):
                    await live.ended.wait()
            self._messaging.bells.forget(member_id)

    def forget_team(self, team_id: str) -> None:
        """Drop what the loops kept for a team that is gone."""
        self._team_locks.pop(team_id, None)

    async def _loop(self, member_id: str, live: _Live, wait_first: bool) -> None:
        """Take a turn whenever there is work (the first prompt, or messages); else sleep
        until woken."""
        bells = self._messaging.bells
        try:
            with live.scope:
                if wait_first:
                    await bells.current(member_id).wait()
                while True:
                    bell = bells.reset(member_id)
                    member = await self._store.get(Member, member_id)
                    if member is None or member.status not in LIVE_MEMBER:
                        return
                    if not await self._ready(member, live):
                        return
                    work = await self._work(member)
                    if work is None:
                        await self._move(member_id, REST_MEMBER)
                        await bell.wait()
                        continue
                    await self._turn(member, live, *work)
        except StateError as exc:  # stopped or failed behind the loop's back: it has nothing more to do
            log.info("member %s left its loop: %s", member_id, exc)
        except Exception:  # a member's trouble must not take the server down
            log.exception("member %s stopped on an unexpected error", member_id)
            with anyio.CancelScope(shield=True):
                await self._fail(member_id, "dockyard hit an unexpected error")
        finally:
            live.ended.set()

    async def _ready(self, member: Member, live: _Live) -> bool:
        """Give the member its sandbox and a token for its state, if it lacks them."""
        try:
            if member.sandbox_id is None:
                await self._move(member.id, PREPARE_MEMBER)
                member.sandbox_id = await self._sandbox_for(member)
                await self._store.update(Member, member.id, sandbox_id=member.sandbox_id)
            if live.token is None or (live.planning and not _planning(member)):  # a plan approved: a token that may act
                team = await self._access.team_row(member.team_id)
                scopes = await self._member_scopes(member, team)
                await self._tokens.revoke_run(member.id, "replaced by a new token")
                minted = await self._tokens.mint_for_run(
                    run_of(team, member.id, scopes),
                    member.id,
                    scopes,
                    utcnow() + timedelta(seconds=self._settings.teams.member_token_ttl_s),
                    member.sandbox_id,
                    parent_id=team.lead_token_id,  # revoking the lead's token revokes its members'
                )
                live.token, live.token_id, live.scopes = minted.token, minted.token_id, minted.identity.scopes
                live.planning = _planning(member)
                await self._store.update(Member, member.id, token_id=minted.token_id)
        except DockyardError as exc:
            await self._fail(member.id, f"could not start: {exc}")
            return False
        return True

    async def _member_scopes(self, member: Member, team: Team) -> list[Scope]:
        """team:member, plus (once any plan is approved) the member's work scopes that its lead
        holds too: a member never gets more than the lead who spawned it."""
        if _planning(member):
            return list(_PLANNING_SCOPES)
        lead = self._settings.operator.scopes
        if team.lead_token_id is not None:
            token = await self._store.get(Token, team.lead_token_id)
            lead = token.scopes if token is not None else []
        return [
            Scope.TEAM_MEMBER,
            *(s for s in _MEMBER_SCOPES if s != Scope.TEAM_MEMBER and ("*" in lead or s in lead)),
        ]

    async def _sandbox_for(self, member: Member) -> str:
        team = await self._access.team_row(member.team_id)
        ttl = self._settings.sandbox.max_ttl_s
        if member.isolation == "own":
            return (await self._sandboxes.create(owner(member, team), ttl_s=ttl)).sandbox_id
        lock = self._team_locks.setdefault(team.id, anyio.Lock())
        async with lock:  # the first shared member makes the team's sandbox; the rest join it
            team = await self._access.team_row(member.team_id)
            if team.sandbox_id is None:
                team.sandbox_id = (await self._sandboxes.create(team_owner(team), ttl_s=ttl)).sandbox_id
                await self._store.add(team)
            member.unix_user = await self._seat(member, team.sandbox_id)
            return team.sandbox_id

    async def _seat(self, member: Member, sandbox_id: str) -> str:
        """A Unix user of the shared sandbox that no other member there has: the member's own,
        recorded on its row, so no teammate can read its token or processes."""

        def take(session: Session) -> str:
            taken = {m.unix_user for m in session.exec(select(Member).where(Member.sandbox_id == sandbox_id)).all()}
            row = session.get(Member, member.id)
            free = [user for user in MEMBER_USERS if user not in taken]
            if row is None or not free:
                raise InvalidRequestError(
                    f"the team's shared sandbox has no Unix user left for another member (at most {len(MEMBER_USERS)})"
                )
            row.sandbox_id, row.unix_user = sandbox_id, free[0]
            session.add(row)
            return free[0]

        return await self._store.run(take)

    async def _work(self, member: Member) -> tuple[str, list[Message]] | None:
        """The next turn's work: the first prompt, else every message not yet taken."""
        if member.turns == 0:
            return member.prompt, []
        messages = await self._messaging.take(member)
        return (as_text(messages, await self._access.roles(member.team_id)), messages) if messages else None

    async def _turn(self, member: Member, live: _Live, text: str, messages: list[Message]) -> None:
        """Run one turn on `text` (with `messages` as its input), then deliver the messages."""
        team = await self._access.team_row(member.team_id)
        turn = member.turns + 1
        # Busy, so no longer ready: a member a restart interrupted leaves the lead's notice here.
        await self._move(member.id, BEGIN_TURN, turns=turn)
        await self._messaging.mirror(member)
        owner = _acting(member, team, live)
        env = _member_env(member, team, live, turn)
        # On the record before it runs: if dockyard dies mid-turn, the next start marks it interrupted.
        begun = await self._audit.append(
            owner,
            Action.TEAM_TURN,
            target=member.team_id,
            outcome="started",
            detail={"member": member.role, "turn": turn},
        )
        try:
            output, error = await self._run(member, owner, env, text, messages, turn)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._audit.append(
                    owner,
                    Action.TEAM_TURN,
                    target=member.team_id,
                    outcome="cancelled",
                    detail={"member": member.role, "turn": turn, "started_id": begun.id},
                )
            raise
        with anyio.CancelScope(shield=True):

            def deliver(session: Session) -> None:
                now = utcnow()
                for message in messages:
                    row = session.get(Message, message.id)
                    if row is not None:
                        row.delivered_at = now
                        session.add(row)
                done = session.get(Member, member.id)
                if done is not None:
                    done.last_output, done.last_error = output, error
                    session.add(done)

            await self._store.run(deliver)
            await self._access.changed(team, TEAM, *([INBOX] if messages else []))
            await self._audit.append(
                owner,
                Action.TEAM_TURN,
                target=member.team_id,
                outcome="error" if error else "ok",
                detail={"member": member.role, "turn": turn, "error": error, "started_id": begun.id},
            )

    async def _run(
        self, member: Member, owner: Identity, env: dict[str, str], text: str, messages: list[Message], turn: int
    ) -> tuple[str | None, str | None]:
        """Run the member's runner for one turn, through the runner core: its output, and why it
        failed if it did. An `llm` member goes on with its stored conversation, `text` a new user turn."""
        profile = self._settings.runners[member.runner]
        is_script = profile.kind == "script"
        conversation = await self._conversation(member, text) if profile.kind == "llm" else None
        job = Job(
            profile,
            prompt=member.prompt if is_script else text,
            owner=owner,
            where=InSandbox(member.sandbox_id or ""),
            timeout_s=min(profile.timeout_s, self._settings.sandbox.exec_max_timeout_s),
            env=env,
            stdin="".join(json.dumps(wire(m)) + "\n" for m in messages) if is_script else None,
            conversation=conversation,
            system=_system(member),
            tools=LlmTools(TEAM_TOOLS, lambda sandbox: self._carry_out(member, owner, sandbox)),
        )
        try:
            ran = await self._runners.run(job)
        except DockyardError as exc:
            return None, f"turn {turn} failed: {exc}"
        finally:
            if conversation is not None:  # what the model said and did so far, even if cut short
                with anyio.CancelScope(shield=True):
                    await self._store.update(Member, member.id, conversation=conversation)
        output = ran.output[-_OUTPUT_CAP:]
        if ran.timed_out:
            return output or None, f"turn {turn} did not finish within {job.timeout_s} s"
        if not ran.is_ok:
            return output, f"turn {turn} exited with code {ran.exit_code}: {ran.stderr.strip()[-2000:]}"
        return output, None

    async def _conversation(self, member: Member, text: str) -> list[dict[str, Any]]:
        """An `llm` member's conversation with `text` as its new user turn, stored before the turn runs."""
        row = await self._store.get(Member, member.id)
        assert row is not None
        conversation = list(row.conversation or opening(text, _system(member)))
        if row.conversation:
            conversation.append({"role": "user", "content": text})
        await self._store.update(Member, member.id, conversation=conversation)
        return conversation

    def _carry_out(self, member: Member, owner: Identity, sandbox: SandboxTools) -> SandboxTools:
        """What carries out an `llm` member's tool calls: the team tools in process, as the
        member, and the sandbox tools, refused while a plan waits for approval."""

        async def carry_out(name: str, arguments: dict[str, Any]) -> str:
            current = await self._store.get(Member, member.id)
            if name in PLAN_BLOCKED and current is not None and _planning(current):
                return f"error: {name} is not allowed yet: you are in plan mode; propose a plan with team_propose_plan and wait for approval"
            if name in MEMBER_TOOLS:
                return await call_team_tool(self._tools, owner, member.team_id, name, arguments)
            return await sandbox(name, arguments)

        return carry_out

    async def _move(self, member_id: str, transition: Transition[Any], **values: object) -> None:
        """Move a member along its lifecycle (and set `values`) in one transaction."""

        def move(session: Session) -> str | None:
            row = session.get(Member, member_id)
            if row is None:
                return None
            transition.apply(row)
            for name, value in values.items():
                setattr(row, name, value)
            session.add(row)
            return row.team_id

        team_id = await self._store.run(move)
        if team_id is not None:
            await self._access.changed(team_id, TEAM)

    async def _fail(self, member_id: str, error: str) -> None:
        """Mark a member failed with why, unless it was stopped meanwhile."""
        try:
            await self._move(member_id, FAIL_MEMBER, last_error=error)
        except StateError as exc:
            log.info("member %s not marked failed (%s): %s", member_id, error, exc)


def _planning(member: Member) -> bool:
    """Whether a member still waits for its plan's approval before it may act."""
    return member.plan_mode and member.plan_status != PlanStatus.APPROVED


def _system(member: Member) -> str:
    plan = (
        (
            " You are in plan mode: read what you need, then propose a plan with team_propose_plan; do not run "
            "commands or write files until the lead approves it."
        )
        if member.plan_mode
        else ""
    )
    return (
        f"You are '{member.role}', a member of a team of agents. You work in a Linux sandbox (/workspace). Use the "
        "sandbox tools to work and the team tools to talk to teammates, claim tasks from the shared list and report "
        "results. Messages from teammates arrive as new user turns. When you have nothing more to do now, answer "
        f"briefly with what you did and call no tool.{plan}"
    )


def _acting(member: Member, team: Team, live: _Live) -> Identity:
    """The member as it calls tools in process: its token's identity."""
    return run_of(team, member.id, list(live.scopes), token_id=live.token_id, sandbox_id=member.sandbox_id)


def _member_env(member: Member, team: Team, live: _Live, turn: int) -> dict[str, str]:
    return {
        "DOCKYARD_WORKSPACE_ID": team.workspace_id,
        "DOCKYARD_PROJECT_ID": team.project_id,
        "DOCKYARD_USER_ID": team.user_id,
        "DOCKYARD_RUN_ID": member.id,
        "DOCKYARD_TEAM_ID": team.id,
        "DOCKYARD_MEMBER_ID": member.id,
        "DOCKYARD_ROLE": member.role,
        "DOCKYARD_TURN": str(turn),
        "DOCKYARD_INBOX": f"/workspace/{INBOX_DIR}/{member.role}.jsonl",
        "DOCKYARD_PLAN_STATUS": (member.plan_status or "none") if member.plan_mode else "off",
        "DOCKYARD_TOKEN": live.token or "",
    }
