"""Agent teams: a lead spawns members that message each other, claim tasks and propose plans.

A member is a logical agent with a conversation made of turns. Its first turn works on the
prompt it was spawned with; after each turn it is idle until a message arrives, and the
message wakes it at once (an event, not a polling loop) for a turn that works on every message
that arrived meanwhile. When that turn ends, the messages count as delivered: that is the
receipt the sender sees.

- `script` members run their prompt as a bash script in their sandbox on every turn, with the
  turn's messages as JSON lines on stdin; `command` members run their program with the turn's
  text as the prompt; `llm` members go on with one conversation, each message a user turn,
  and the team tools next to the sandbox tools.
- Each member acts with its own token (team:member plus work in its own sandbox), in process
  for `llm` members and through `dockyard-bridge` for programs in the sandbox, so every
  message, claim and plan has a known author. Tokens a member hands on (a dispatch's run, a
  sandbox's bridge) never carry team scopes.
- A member in plan mode works with a token that may only use the team tools until the lead
  approves its plan; an `llm` member is also refused commands and writes meanwhile.
- Inboxes are rows in the store, mirrored into the recipient's sandbox as JSON lines at
  `/workspace/.dockyard/inbox/<role>.jsonl`.
- After a restart, members that were busy are marked ready (never re-run behind the lead's
  back) and the lead's next look at the team says who was interrupted; a message resumes them.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import anyio
import anyio.abc
from sqlalchemy import delete
from sqlmodel import Session, col, select

from dockyard.runtime.audit import AuditLog
from dockyard.runtime.errors import DockyardError, InvalidRequestError, NotFoundError, SizeLimitError
from dockyard.runtime.runners.llm import TOOLS, opening, run_llm, sandbox_tools
from dockyard.runtime.models import (
    Inbox,
    MemberInfo,
    MessageInfo,
    MessagesSent,
    TaskInfo,
    TasksAdded,
    TeamForgotten,
    TeamInfo,
    TeamView,
)
from dockyard.runtime.provision import MEMBER_USERS
from dockyard.runtime.runs import link_run
from dockyard.runtime.sandboxes import SandboxService
from dockyard.runtime.settings import Identity, Settings
from dockyard.runtime.store import Member, MemberStatus, Message, Sandbox, SandboxStatus, Store, Team, TeamTask, Token, utcnow
from dockyard.runtime.tokens import TokenService

__all__ = ["ISOLATIONS", "LEAD", "TeamService"]

log = logging.getLogger(__name__)

LEAD = "lead"
ISOLATIONS = ("shared", "own")
_ACTIVE, _SHUT_DOWN = "active", "shut down"
# A member's token: the team tools, work in its own sandbox, and helpers it may dispatch.
_MEMBER_SCOPES = ["team:member", "sandbox:exec", "sandbox:files", "dispatch:create", "dispatch:read"]
# Until the lead approves its plan, a member in plan mode may only use the team tools.
_PLANNING_SCOPES = ["team:member"]
_OUTPUT_CAP = 64 * 1024
_INBOX_DIR = ".dockyard/inbox"

_TEAM_TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "team_message", "description": "Send a message to one teammate (by role) or to 'lead'.",
        "parameters": {"type": "object", "properties": {"to": {"type": "string"}, "body": {"type": "string"}}, "required": ["to", "body"]}}},
    {"type": "function", "function": {
        "name": "team_broadcast", "description": "Send a message to every other member of the team.",
        "parameters": {"type": "object", "properties": {"body": {"type": "string"}}, "required": ["body"]}}},
    {"type": "function", "function": {
        "name": "team_tasks", "description": "The team's members (status, last output) and its shared task list.",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "team_read", "description": "Messages to you, and the messages you sent with whether each was delivered.",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "team_claim", "description": "Claim an open task (by task_id, or the next open one); only one member gets it.",
        "parameters": {"type": "object", "properties": {"task_id": {"type": "string"}}}}},
    {"type": "function", "function": {
        "name": "team_complete", "description": "Finish a task you claimed with its result (failed=true if it could not be done).",
        "parameters": {"type": "object", "properties": {"task_id": {"type": "string"}, "result": {"type": "string"},
                                                        "failed": {"type": "boolean"}}, "required": ["task_id", "result"]}}},
    {"type": "function", "function": {
        "name": "team_propose_plan", "description": "Plan mode: propose your plan to the lead and wait for approval.",
        "parameters": {"type": "object", "properties": {"plan": {"type": "string"}}, "required": ["plan"]}}},
]
_PLAN_BLOCKED = {"exec", "write_file"}


def _system(member: Member) -> str:
    plan = (" You are in plan mode: read what you need, then propose a plan with team_propose_plan; do not run "
            "commands or write files until the lead approves it.") if member.plan_mode else ""
    return (
        f"You are '{member.role}', a member of a team of agents. You work in a Linux sandbox (/workspace). Use the "
        "sandbox tools to work and the team tools to talk to teammates, claim tasks from the shared list and report "
        "results. Messages from teammates arrive as new user turns. When you have nothing more to do now, answer "
        f"briefly with what you did and call no tool.{plan}"
    )


@dataclass
class _Live:
    """A member's loop, for waking and stopping it."""

    wake: anyio.Event = field(default_factory=anyio.Event)
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    ended: anyio.Event = field(default_factory=anyio.Event)
    token: str | None = None  # its current token, handed to each turn
    token_id: str | None = None
    scopes: list[str] = field(default_factory=list)  # what that token may do


class TeamService:
    """Creates teams, runs their members, and carries their messages, tasks and plans."""

    def __init__(
        self, settings: Settings, store: Store, audit: AuditLog, sandboxes: SandboxService, tokens: TokenService
    ) -> None:
        self._settings = settings
        self._limits = settings.teams
        self._store = store
        self._audit = audit
        self._sandboxes = sandboxes
        self._tokens = tokens
        self._live: dict[str, _Live] = {}
        self._tg: anyio.abc.TaskGroup | None = None
        self._team_locks: dict[str, anyio.Lock] = {}

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Mark members a stop interrupted, restart every member's loop, then hold the loops."""

        def recover(session: Session) -> list[tuple[Member, bool]]:
            loops: list[tuple[Member, bool]] = []
            teams = {t.id: t for t in session.exec(select(Team).where(Team.status == _ACTIVE)).all()}
            members = session.exec(select(Member).where(col(Member.team_id).in_(list(teams)))).all()
            for member in members:
                if member.status in (MemberStatus.BUSY, MemberStatus.STARTING):
                    member.status = MemberStatus.READY
                    team = teams[member.team_id]
                    team.interrupted = sorted({*(team.interrupted or []), member.role})
                    session.add(team)
                    session.add(member)
                    # What its interrupted turn had taken goes back to its inbox, unprocessed.
                    for message in session.exec(
                        select(Message).where(Message.recipient == member.id, col(Message.taken_at).is_not(None),
                                              col(Message.delivered_at).is_(None))
                    ).all():
                        message.taken_at = None
                        session.add(message)
                if member.status in (MemberStatus.IDLE, MemberStatus.READY):
                    loops.append((member, member.status == MemberStatus.READY))
            return loops

        loops = await self._store.run(recover)
        async with anyio.create_task_group() as tg:
            self._tg = tg
            for member, wait_first in loops:
                self._start(member, wait_first=wait_first)
            task_status.started()
            await anyio.sleep_forever()

    # -- the lead's tools -----------------------------------------------------------------

    async def create(self, who: Identity, name: str) -> TeamInfo:
        """A new, empty team led by the caller."""
        name = name.strip()
        if not name or len(name) > 100:
            raise InvalidRequestError("a team needs a name of 1 to 100 characters")
        team = Team(id=f"team_{secrets.token_hex(6)}", name=name, workspace_id=who.workspace_id, project_id=who.project_id,
                    user_id=who.user_id, lead_token_id=who.token_id)
        async with self._audit.record(who, "team.create", team.id, name=name, token_id=who.token_id):

            def insert(session: Session) -> None:
                session.add(team)
                link_run(session, team.id, who.run_id)  # its shared sandbox counts in the lead's run

            await self._store.run(insert)
        return _team_info(team)

    async def spawn(
        self,
        who: Identity,
        team_id: str,
        *,
        role: str,
        prompt: str,
        runner: str | None = None,
        isolation: str = "own",
        plan_mode: bool = False,
    ) -> MemberInfo:
        """Add a member and start its first turn in the background; returns at once."""
        runner = runner or "script"
        async with self._audit.record(who, "team.spawn", team_id, role=role, runner=runner, isolation=isolation,
                                      plan_mode=plan_mode, token_id=who.token_id) as rec:
            team = await self._lead_of(who, team_id, "team.spawn")
            role = role.strip()
            if not role or len(role) > 64 or role == LEAD or not all(c.isalnum() or c in "-_." for c in role):
                raise InvalidRequestError("a role is 1 to 64 letters, digits, '-', '_' or '.', and not 'lead'")
            if isolation not in ISOLATIONS:
                raise InvalidRequestError(f"unknown isolation '{isolation}'; allowed: shared (the team's sandbox), own")
            if runner not in self._settings.runners:
                raise InvalidRequestError(f"unknown runner '{runner}'; allowed: {', '.join(sorted(self._settings.runners))}")
            if not prompt.strip():
                raise InvalidRequestError("a member needs a prompt: its task (for the script runner, its script)")
            member = Member(id=f"mem_{secrets.token_hex(6)}", team_id=team.id, role=role, runner=runner,
                            isolation=isolation, prompt=prompt, plan_mode=plan_mode)
            rec.target = member.id

            def insert(session: Session) -> str | None:
                others = session.exec(select(Member).where(Member.team_id == team.id)).all()
                if any(other.role == role for other in others):
                    return f"the team already has a member with role '{role}'; pick another role"
                if len(others) >= self._limits.max_members:
                    return f"the team is at its limit of {self._limits.max_members} members"
                session.add(member)
                link_run(session, member.id, who.run_id)  # a child of the lead's run: counted in its tree
                return None

            if (refusal := await self._store.run(insert)) is not None:
                raise InvalidRequestError(refusal)
        self._start(member, wait_first=False)
        return _member_info(member)

    async def approve_plan(self, who: Identity, team_id: str, member_ref: str, approve: bool, feedback: str | None) -> MemberInfo:
        """Approve a member's pending plan (it may act from its next turn) or reject it with
        feedback (it may propose again); either way the answer wakes it."""
        async with self._audit.record(who, "team.approve_plan", team_id, member=member_ref, approve=approve,
                                      token_id=who.token_id) as rec:
            team = await self._lead_of(who, team_id, "team.approve_plan")
            member = await self._member(team, member_ref)
            rec.target = member.id
            if member.plan_status != "pending":
                raise InvalidRequestError(f"'{member.role}' has no plan waiting for approval (its plan status: {member.plan_status or 'none yet'})")
            text = feedback.strip() if feedback else ""
            if approve:
                body = "Your plan was approved. Go ahead with it." + (f" Feedback: {text}" if text else "")
            else:
                body = f"Your plan was rejected. Feedback: {text or 'none given'}. Revise it and propose again with team_propose_plan."
            status = "approved" if approve else "rejected"

            def decide(session: Session) -> Member:
                row = session.get(Member, member.id)
                assert row is not None
                row.plan_status, row.plan_feedback = status, text or None
                session.add(row)
                session.add(Message(team_id=team.id, sender=LEAD, recipient=member.id, kind="plan", body=body,
                                    author_user_id=who.user_id, author_token_id=who.token_id))
                return row

            member = await self._store.run(decide)
        if approve and (live := self._live.get(member.id)) is not None:
            live.token = None  # the next turn gets a token that may act
        self._wake(member.id)
        return _member_info(member, await self._notice_for(who, team))

    async def shutdown(self, who: Identity, team_id: str) -> TeamView:
        """Stop every member (a running turn is killed), revoke their tokens and give their
        sandboxes back to the pool."""
        async with self._audit.record(who, "team.shutdown", team_id, token_id=who.token_id):
            team = await self._lead_of(who, team_id, "team.shutdown")
            await self._tokens.may_end(who, team.user_id, "team.shutdown", team.id, "team")
            await self._stop_all(team)
        return await self.view(who, team_id)

    async def cleanup(self, who: Identity, team_id: str) -> TeamForgotten:
        """Shut the team down if it is not, then forget it: members, inboxes (rows and mirror
        files), tasks and the team itself. The audit keeps the record of what happened."""
        async with self._audit.record(who, "team.cleanup", team_id, token_id=who.token_id) as rec:
            team = await self._lead_of(who, team_id, "team.cleanup")
            await self._tokens.may_end(who, team.user_id, "team.cleanup", team.id, "team")
            await self._stop_all(team)

            def forget(session: Session) -> dict[str, int]:
                counts = {
                    "messages": len(session.exec(select(Message.id).where(Message.team_id == team.id)).all()),
                    "tasks": len(session.exec(select(TeamTask.id).where(TeamTask.team_id == team.id)).all()),
                    "members": len(session.exec(select(Member.id).where(Member.team_id == team.id)).all()),
                }
                for model, column in ((Message, Message.team_id), (TeamTask, TeamTask.team_id), (Member, Member.team_id), (Team, Team.id)):
                    session.execute(delete(model).where(col(column) == team.id))
                return counts

            counts = await self._store.run(forget)
            rec.detail.update(counts)
        self._team_locks.pop(team.id, None)
        return TeamForgotten(team_id=team.id, **counts)

    # -- everyone's tools -----------------------------------------------------------------

    async def view(self, who: Identity, team_id: str) -> TeamView:
        """Every member's status and the shared task list."""
        team = await self._team(who, team_id, "team.tasks")
        party = await self._party(who, team, "team.tasks")

        def read(session: Session) -> tuple[list[Member], list[TeamTask]]:
            members = list(session.exec(select(Member).where(Member.team_id == team.id).order_by(col(Member.created_at))).all())
            tasks = list(session.exec(select(TeamTask).where(TeamTask.team_id == team.id).order_by(col(TeamTask.created_at), col(TeamTask.id))).all())
            return members, tasks

        members, tasks = await self._store.run(read)
        roles = {m.id: m.role for m in members}
        notice = self._notice(team) if party == LEAD else None
        return TeamView(team=_team_info(team, notice), members=[_member_info(m) for m in members],
                        tasks=[_task_info(t, roles) for t in tasks], notice=notice)

    async def message(self, who: Identity, team_id: str, to: str, body: str) -> MessagesSent:
        """Append a message to one inbox (a member's by role, or the lead's) and wake its owner."""
        async with self._audit.record(who, "team.message", team_id, to=to, size=len(body.encode()), token_id=who.token_id) as rec:
            team = await self._team(who, team_id, "team.message")
            sender = await self._party(who, team, "team.message")
            self._check_body(body)
            recipient = LEAD if to == LEAD else await self._reachable(team, to)
            if recipient == sender:
                raise InvalidRequestError("a member cannot message itself")
            notice = await self._notice_for(who, team)  # as it stood when the lead wrote
            sent = await self._send(who, team, sender, [recipient], body, "message")
            rec.detail["message_ids"] = [m.message_id for m in sent]
        return MessagesSent(messages=sent, notice=notice)

    async def broadcast(self, who: Identity, team_id: str, body: str) -> MessagesSent:
        """Append a message to every member's inbox (but the sender's) and wake them all."""
        async with self._audit.record(who, "team.broadcast", team_id, size=len(body.encode()), token_id=who.token_id) as rec:
            team = await self._team(who, team_id, "team.broadcast")
            sender = await self._party(who, team, "team.broadcast")
            self._check_body(body)
            members = await self._store.run(lambda s: list(s.exec(select(Member).where(
                Member.team_id == team.id, col(Member.status).not_in([MemberStatus.STOPPED, MemberStatus.FAILED]))).all()))
            recipients = [m.id for m in members if m.id != sender]
            if not recipients:
                raise InvalidRequestError("the team has no other member to broadcast to; team_spawn adds members")
            notice = await self._notice_for(who, team)
            sent = await self._send(who, team, sender, recipients, body, "broadcast")
            rec.detail["message_ids"] = [m.message_id for m in sent]
        return MessagesSent(messages=sent, notice=notice)

    async def inbox(self, who: Identity, team_id: str) -> Inbox:
        """Messages to the caller and the receipts of those it sent. The lead reading its
        inbox is the receipt of what it received."""
        team = await self._team(who, team_id, "team.read")
        me = await self._party(who, team, "team.read")

        def read(session: Session) -> tuple[list[Message], list[Message], dict[str, str]]:
            received = list(session.exec(select(Message).where(Message.team_id == team.id, Message.recipient == me).order_by(col(Message.id))).all())
            sent = list(session.exec(select(Message).where(Message.team_id == team.id, Message.sender == me).order_by(col(Message.id))).all())
            if me == LEAD:
                for message in received:
                    if message.delivered_at is None:
                        message.taken_at = message.delivered_at = utcnow()
                        session.add(message)
            roles = {m.id: m.role for m in session.exec(select(Member).where(Member.team_id == team.id)).all()}
            return received, sent, roles

        received, sent, roles = await self._store.run(read)
        return Inbox(received=[_message_info(m, roles) for m in received], sent=[_message_info(m, roles) for m in sent],
                     notice=self._notice(team) if me == LEAD else None)

    async def add_tasks(self, who: Identity, team_id: str, tasks: list[tuple[str, str | None]]) -> TasksAdded:
        """Add open tasks to the shared list."""
        async with self._audit.record(who, "team.add_tasks", team_id, count=len(tasks), token_id=who.token_id) as rec:
            team = await self._team(who, team_id, "team.add_tasks")
            author = await self._party(who, team, "team.add_tasks")
            if not tasks or any(not title.strip() for title, _ in tasks):
                raise InvalidRequestError("give at least one task, each with a title")
            rows = [TeamTask(id=f"task_{secrets.token_hex(6)}", team_id=team.id, title=title.strip()[:500], detail=detail,
                             created_by=author) for title, detail in tasks]

            def insert(session: Session) -> str | None:
                present = len(session.exec(select(TeamTask.id).where(TeamTask.team_id == team.id)).all())
                if present + len(rows) > self._limits.max_tasks:
                    return f"a team holds at most {self._limits.max_tasks} tasks; it has {present}"
                session.add_all(rows)
                return None

            if (refusal := await self._store.run(insert)) is not None:
                raise InvalidRequestError(refusal)
            rec.detail["task_ids"] = [row.id for row in rows]
        return TasksAdded(tasks=[_task_info(row, {}) for row in rows])

    async def claim(self, who: Identity, team_id: str, task_id: str | None) -> TaskInfo:
        """Claim an open task for the calling member, atomically: never two owners."""
        async with self._audit.record(who, "team.claim", task_id or team_id, token_id=who.token_id) as rec:
            team = await self._team(who, team_id, "team.claim")
            me = await self._party(who, team, "team.claim")
            if me == LEAD:
                raise InvalidRequestError("members claim tasks; the lead adds them (team_add_tasks) and reads them (team_tasks)")

            def take(session: Session) -> TeamTask | str:
                query = select(TeamTask).where(TeamTask.team_id == team.id)
                if task_id is not None:
                    row = session.exec(query.where(TeamTask.id == task_id)).first()
                    if row is None:
                        return f"unknown task '{task_id}' in this team; team_tasks lists them"
                    if row.status != "open":
                        holder = session.get(Member, row.owner) if row.owner else None
                        return f"task '{task_id}' is {row.status}" + (f" by '{holder.role}'" if holder else "") + "; claim an open one"
                else:
                    row = session.exec(query.where(TeamTask.status == "open").order_by(col(TeamTask.created_at), col(TeamTask.id))).first()
                    if row is None:
                        return "no open task is left to claim"
                row.status, row.owner, row.claimed_at = "claimed", me, utcnow()
                session.add(row)
                return row

            taken = await self._store.run(take)
            if isinstance(taken, str):
                raise InvalidRequestError(taken)
            rec.target = taken.id
        return _task_info(taken, {me: await self._role(me)})

    async def complete(self, who: Identity, team_id: str, task_id: str, result: str, failed: bool) -> TaskInfo:
        """Finish a task the calling member holds, with its result."""
        async with self._audit.record(who, "team.complete", task_id, failed=failed, token_id=who.token_id):
            team = await self._team(who, team_id, "team.complete")
            me = await self._party(who, team, "team.complete")
            self._check_body(result)

            def finish(session: Session) -> TeamTask | str:
                row = session.get(TeamTask, task_id)
                if row is None or row.team_id != team.id:
                    return f"unknown task '{task_id}' in this team; team_tasks lists them"
                if row.status != "claimed" or row.owner != me:
                    return f"task '{task_id}' is not claimed by you (it is {row.status}); claim it first"
                row.status, row.result, row.finished_at = "failed" if failed else "done", result, utcnow()
                session.add(row)
                return row

            done = await self._store.run(finish)
            if isinstance(done, str):
                raise InvalidRequestError(done)
        return _task_info(done, {me: await self._role(me)})

    async def propose_plan(self, who: Identity, team_id: str, plan: str) -> MemberInfo:
        """A member in plan mode hands its plan to the lead, who approves or rejects it."""
        async with self._audit.record(who, "team.propose_plan", team_id, size=len(plan.encode()), token_id=who.token_id) as rec:
            team = await self._team(who, team_id, "team.propose_plan")
            me = await self._party(who, team, "team.propose_plan")
            if me == LEAD:
                raise InvalidRequestError("the lead approves plans (team_approve_plan); members propose them")
            self._check_body(plan)
            rec.target = me

            def propose(session: Session) -> Member | str:
                row = session.get(Member, me)
                assert row is not None
                if not row.plan_mode:
                    return f"'{row.role}' is not in plan mode: it may act without a plan"
                if row.plan_status == "approved":
                    return "your plan is already approved: go ahead"
                row.plan, row.plan_status, row.plan_feedback = plan, "pending", None
                session.add(row)
                session.add(Message(team_id=team.id, sender=row.id, recipient=LEAD, kind="plan", body=plan,
                                    author_user_id=who.user_id, author_token_id=who.token_id))
                return row

            member = await self._store.run(propose)
            if isinstance(member, str):
                raise InvalidRequestError(member)
        return _member_info(member)

    # -- members' turns -------------------------------------------------------------------

    def _start(self, member: Member, *, wait_first: bool) -> None:
        assert self._tg is not None, "the team service is not running"
        live = self._live.setdefault(member.id, _Live())
        self._tg.start_soon(self._loop, member.id, live, wait_first)

    async def _loop(self, member_id: str, live: _Live, wait_first: bool) -> None:
        """Take a turn whenever there is work (the first prompt, or messages); else sleep
        until woken."""
        try:
            with live.scope:
                if wait_first:
                    await live.wake.wait()
                while True:
                    live.wake = anyio.Event()
                    member = await self._store.get(Member, member_id)
                    if member is None or member.status in (MemberStatus.STOPPED, MemberStatus.FAILED):
                        return
                    if not await self._ready(member, live):
                        return
                    work = await self._take(member)
                    if work is None:
                        await self._update(member_id, status=MemberStatus.IDLE)
                        await live.wake.wait()
                        continue
                    await self._turn(member, live, *work)
        except Exception:  # a member's trouble must not take the server down
            log.exception("member %s stopped on an unexpected error", member_id)
            with anyio.CancelScope(shield=True):
                await self._update(member_id, status=MemberStatus.FAILED, last_error="dockyard hit an unexpected error")
        finally:
            live.ended.set()

    async def _ready(self, member: Member, live: _Live) -> bool:
        """Give the member its sandbox and a token for its state, if it lacks them."""
        try:
            if member.sandbox_id is None:
                await self._update(member.id, status=MemberStatus.STARTING)
                member.sandbox_id = await self._sandbox_for(member)
                await self._update(member.id, sandbox_id=member.sandbox_id)
            if live.token is None:
                team = await self._team_row(member.team_id)
                scopes = await self._member_scopes(member, team)
                await self._tokens.revoke_run(member.id, "replaced by a new token")
                minted = await self._tokens.mint_for_run(
                    _run_of(team, member.id, scopes), member.id, scopes,
                    utcnow() + timedelta(seconds=self._limits.member_token_ttl_s), member.sandbox_id,
                    parent_id=team.lead_token_id,  # revoking the lead's token revokes its members'
                )
                live.token, live.token_id, live.scopes = minted.token, minted.token_id, minted.identity.scopes
                await self._update(member.id, token_id=minted.token_id)
        except DockyardError as exc:
            await self._update(member.id, status=MemberStatus.FAILED, last_error=f"could not start: {exc}")
            return False
        return True

    async def _member_scopes(self, member: Member, team: Team) -> list[str]:
        """team:member, plus (once any plan is approved) the member's work scopes that its lead
        holds too: a member never gets more than the lead who spawned it."""
        if member.plan_mode and member.plan_status != "approved":
            return list(_PLANNING_SCOPES)
        lead = self._settings.operator.scopes
        if team.lead_token_id is not None:
            token = await self._store.get(Token, team.lead_token_id)
            lead = token.scopes if token is not None else []
        return ["team:member", *(s for s in _MEMBER_SCOPES if s != "team:member" and ("*" in lead or s in lead))]

    async def _sandbox_for(self, member: Member) -> str:
        team = await self._team_row(member.team_id)
        ttl = self._settings.sandbox.max_ttl_s
        if member.isolation == "own":
            return (await self._sandboxes.create(_owner(member, team), ttl_s=ttl)).sandbox_id
        lock = self._team_locks.setdefault(team.id, anyio.Lock())
        async with lock:  # the first shared member makes the team's sandbox; the rest join it
            team = await self._team_row(member.team_id)
            if team.sandbox_id is None:
                team.sandbox_id = (await self._sandboxes.create(_team_owner(team), ttl_s=ttl)).sandbox_id
                await self._store.add(team)
            member.unix_user = await self._seat(member, team.sandbox_id)
            return team.sandbox_id

    async def _seat(self, member: Member, sandbox_id: str) -> str:
        """A Unix user of the shared sandbox that no other member there has: the member's own,
        recorded on its row, so no teammate can read its token or processes."""

        def take(session: Session) -> str | None:
            taken = {m.unix_user for m in session.exec(select(Member).where(Member.sandbox_id == sandbox_id)).all()}
            row = session.get(Member, member.id)
            free = [user for user in MEMBER_USERS if user not in taken]
            if row is None or not free:
                return None
            row.sandbox_id, row.unix_user = sandbox_id, free[0]
            session.add(row)
            return free[0]

        if (user := await self._store.run(take)) is None:
            raise InvalidRequestError(f"the team's shared sandbox has no Unix user left for another member (at most {len(MEMBER_USERS)})")
        return user

    async def _take(self, member: Member) -> tuple[str, list[Message]] | None:
        """The next turn's work: the first prompt, else every message not yet taken (marked
        taken in the same transaction)."""
        if member.turns == 0:
            return member.prompt, []

        def take(session: Session) -> list[Message]:
            rows = list(session.exec(
                select(Message).where(Message.recipient == member.id, col(Message.taken_at).is_(None)).order_by(col(Message.id))
            ).all())
            now = utcnow()
            for row in rows:
                row.taken_at = now
                session.add(row)
            return rows

        messages = await self._store.run(take)
        return (_as_text(messages, await self._roles(member.team_id)), messages) if messages else None

    async def _turn(self, member: Member, live: _Live, text: str, messages: list[Message]) -> None:
        """Run one turn on `text` (with `messages` as its input), then deliver the messages."""
        team = await self._team_row(member.team_id)
        turn = member.turns + 1
        await self._update(member.id, status=MemberStatus.BUSY, turns=turn)
        # The member's interrupted mark is cleared as soon as it works again.
        if team.interrupted and member.role in team.interrupted:
            await self._update_team(team.id, interrupted=[r for r in team.interrupted if r != member.role] or None)
        await self._mirror(member)
        profile = self._settings.runners[member.runner]
        owner = _acting(member, team, live)
        env = _member_env(member, team, live, turn)
        output, error = None, None
        # On the record before it runs: if dockyard dies mid-turn, the next start marks it interrupted.
        begun = await self._audit.append(owner, "team.turn", target=member.team_id, outcome="started",
                                         detail={"member": member.role, "turn": turn})
        try:
            with anyio.fail_after(profile.timeout_s):
                if profile.kind == "llm":
                    output = await self._llm_turn(member, owner, env, text)
                else:
                    stdin = "".join(json.dumps(_wire(m)) + "\n" for m in messages) if profile.kind == "script" else None
                    work: str | list[str] = member.prompt if profile.kind == "script" else [a.replace("{prompt}", text) for a in profile.argv]
                    ran = await self._sandboxes.exec(owner, member.sandbox_id or "", work, stdin=stdin, runner_env=env,
                                                     timeout_s=min(profile.timeout_s, self._settings.sandbox.exec_max_timeout_s))
                    output = ran.stdout[-_OUTPUT_CAP:]
                    if ran.timed_out or ran.exit_code != 0:
                        error = f"turn {turn} exited with code {ran.exit_code}: {ran.stderr.strip()[-2000:]}"
        except TimeoutError:
            error = f"turn {turn} did not finish within {profile.timeout_s} s"
        except DockyardError as exc:
            error = f"turn {turn} failed: {exc}"
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._audit.append(owner, "team.turn", target=member.team_id, outcome="cancelled",
                                         detail={"member": member.role, "turn": turn, "started_id": begun.id})
            raise
        with anyio.CancelScope(shield=True):
            def deliver(session: Session) -> None:
                now = utcnow()
                for message in messages:
                    row = session.get(Message, message.id)
                    if row is not None:
                        row.delivered_at = now
                        session.add(row)
                row = session.get(Member, member.id)
                if row is not None:
                    row.last_output, row.last_error = output, error
                    session.add(row)

            await self._store.run(deliver)
            await self._audit.append(owner, "team.turn", target=member.team_id, outcome="error" if error else "ok",
                                     detail={"member": member.role, "turn": turn, "error": error, "started_id": begun.id})

    async def _llm_turn(self, member: Member, owner: Identity, env: dict[str, str], text: str) -> str:
        """Go on with the member's conversation: `text` is a new user turn."""
        row = await self._store.get(Member, member.id)
        assert row is not None
        conversation = list(row.conversation or opening(text, _system(member)))
        if row.conversation:
            conversation.append({"role": "user", "content": text})
        await self._update(member.id, conversation=conversation)
        sandbox = sandbox_tools(self._sandboxes, owner, member.sandbox_id or "", env)

        async def carry_out(name: str, arguments: dict[str, Any]) -> str:
            current = await self._store.get(Member, member.id)
            if name in _PLAN_BLOCKED and current is not None and current.plan_mode and current.plan_status != "approved":
                return f"error: {name} is not allowed yet: you are in plan mode; propose a plan with team_propose_plan and wait for approval"
            if name.startswith("team_"):
                return await self._team_tool(owner, member.team_id, name, arguments)
            return await sandbox(name, arguments)

        try:
            return await run_llm(self._settings.runners[member.runner], conversation, carry_out, [*TOOLS, *_TEAM_TOOLS])
        finally:
            with anyio.CancelScope(shield=True):
                await self._update(member.id, conversation=conversation)

    async def _team_tool(self, who: Identity, team_id: str, name: str, arguments: dict[str, Any]) -> str:
        """A team tool called by an `llm` member, in process, as that member."""
        text = lambda key: str(arguments.get(key, ""))  # noqa: E731
        result: Any
        if name == "team_message":
            result = await self.message(who, team_id, text("to"), text("body"))
        elif name == "team_broadcast":
            result = await self.broadcast(who, team_id, text("body"))
        elif name == "team_tasks":
            result = await self.view(who, team_id)
        elif name == "team_read":
            result = await self.inbox(who, team_id)
        elif name == "team_claim":
            result = await self.claim(who, team_id, arguments.get("task_id") or None)
        elif name == "team_complete":
            result = await self.complete(who, team_id, text("task_id"), text("result"), bool(arguments.get("failed")))
        else:
            result = await self.propose_plan(who, team_id, text("plan"))
        return result.model_dump_json(exclude_none=True)

    async def _mirror(self, member: Member) -> None:
        """Write the member's inbox, as JSON lines, into its sandbox."""
        if member.sandbox_id is None:
            return
        roles = await self._roles(member.team_id)
        rows = await self._store.run(
            lambda s: list(s.exec(select(Message).where(Message.recipient == member.id).order_by(col(Message.id))).all())
        )
        content = "".join(json.dumps(_wire(m, roles)) + "\n" for m in rows)
        try:
            await self._sandboxes.write_file(_owner(member, await self._team_row(member.team_id)), member.sandbox_id,
                                             f"{_INBOX_DIR}/{member.role}.jsonl", content, "utf-8")
        except DockyardError as exc:
            log.info("inbox mirror of %s not written: %s", member.id, exc)

    # -- stopping -------------------------------------------------------------------------

    async def _stop_all(self, team: Team) -> None:
        members = await self._store.run(lambda s: list(s.exec(select(Member).where(Member.team_id == team.id)).all()))
        for member in members:
            if (live := self._live.get(member.id)) is not None:
                live.scope.cancel()
        for member in members:
            if (live := self._live.pop(member.id, None)) is not None:
                with anyio.fail_after(60):
                    await live.ended.wait()
            await self._tokens.revoke_run(member.id, "its team was shut down")
            if member.status != MemberStatus.STOPPED:
                await self._update(member.id, status=MemberStatus.STOPPED)
        # Every sandbox held for the team or one of its members goes back, including one whose
        # claim a stop cut short before the member row learnt of it.
        runs = {team.id: _team_owner(team), **{m.id: _owner(m, team) for m in members}}
        held = await self._store.run(lambda s: list(s.exec(select(Sandbox).where(
            col(Sandbox.run_id).in_(list(runs)), Sandbox.workspace_id == team.workspace_id, Sandbox.status == SandboxStatus.RUNNING)).all()))
        for sandbox in held:
            assert sandbox.run_id is not None
            await self._give_back(runs[sandbox.run_id], sandbox.id)
        await self._update_team(team.id, status=_SHUT_DOWN, interrupted=None)

    async def _give_back(self, owner: Identity, sandbox_id: str) -> None:
        try:
            await self._sandboxes.destroy(owner, sandbox_id)
        except DockyardError as exc:
            log.info("sandbox %s of a team: %s", sandbox_id, exc)

    # -- who is who ---------------------------------------------------------------------

    async def _team(self, who: Identity, team_id: str, action: str) -> Team:
        team = await self._store.get(Team, team_id)
        if team is None or team.workspace_id != who.workspace_id:
            await self._tokens.deny(who, action, "no such team in the caller's reach", team_id)
            raise NotFoundError(f"unknown team '{team_id}'; team_create returns the ids of your teams")
        return team

    async def _party(self, who: Identity, team: Team, action: str) -> str:
        """The caller's place in the team: 'lead', or its member id. A member is who dockyard
        spawned: the caller must present the very token dockyard minted for that member."""
        if who.run_id and who.run_id.startswith("mem_") and who.allows("team:member"):
            member = await self._store.get(Member, who.run_id)
            if member is None or member.team_id != team.id:
                raise await self._tokens.deny(who, action, "this token belongs to a member of another team", team.id)
            if member.token_id is None or not hmac.compare_digest(member.token_id.encode(), (who.token_id or "-").encode()):
                raise await self._tokens.deny(who, action, f"this token is not the one dockyard issued to '{member.role}'", team.id)
            if member.status == MemberStatus.STOPPED:
                raise await self._tokens.deny(who, action, f"'{member.role}' was shut down", team.id)
            return member.id
        if who.allows("team:lead"):
            if team.status != _ACTIVE and action not in ("team.tasks", "team.read", "team.shutdown", "team.cleanup"):
                raise InvalidRequestError(f"team '{team.id}' is shut down; team_cleanup forgets it, team_create starts a new one")
            return LEAD
        raise await self._tokens.deny(who, action, "team tools need the team:lead scope (the lead) or a member's token", team.id)

    async def _lead_of(self, who: Identity, team_id: str, action: str) -> Team:
        team = await self._team(who, team_id, action)
        if await self._party(who, team, action) != LEAD:
            raise await self._tokens.deny(who, action, f"{action.replace('.', '_')} is for the team's lead only", team.id)
        return team

    async def _member(self, team: Team, ref: str) -> Member:
        """A member of `team` by role or id."""
        members = await self._store.run(lambda s: list(s.exec(select(Member).where(Member.team_id == team.id)).all()))
        for member in members:
            if ref in (member.role, member.id):
                return member
        roles = ", ".join(m.role for m in members) or "none yet"
        raise NotFoundError(f"unknown member '{ref}' in team '{team.id}'; members: {roles} (or 'lead')")

    async def _reachable(self, team: Team, ref: str) -> str:
        """A member that can still take messages."""
        member = await self._member(team, ref)
        if member.status == MemberStatus.STOPPED:
            raise InvalidRequestError(f"'{member.role}' was shut down and takes no more messages")
        if member.status == MemberStatus.FAILED:
            raise InvalidRequestError(f"'{member.role}' could not start ({member.last_error}); spawn it again under another role")
        return member.id

    async def _role(self, party: str) -> str:
        if party == LEAD:
            return LEAD
        member = await self._store.get(Member, party)
        return member.role if member else party

    async def _roles(self, team_id: str) -> dict[str, str]:
        return await self._store.run(lambda s: {m.id: m.role for m in s.exec(select(Member).where(Member.team_id == team_id)).all()})

    async def _team_row(self, team_id: str) -> Team:
        team = await self._store.get(Team, team_id)
        assert team is not None
        return team

    def _notice(self, team: Team) -> str | None:
        if not team.interrupted:
            return None
        return f"Server was restarted. Teammates interrupted: {', '.join(team.interrupted)}. Use team_message to resume."

    async def _notice_for(self, who: Identity, team: Team) -> str | None:
        """The restart notice, for the lead (members are not told)."""
        if who.run_id and who.run_id.startswith("mem_") and who.allows("team:member"):
            return None
        return self._notice(await self._team_row(team.id))

    # -- messages -------------------------------------------------------------------------

    def _check_body(self, body: str) -> None:
        size = len(body.encode())
        if not body.strip():
            raise InvalidRequestError("the message is empty")
        if size > self._limits.message_max_bytes:
            raise SizeLimitError(f"the message is {size} bytes; the cap is {self._limits.message_max_bytes} bytes")

    async def _send(self, who: Identity, team: Team, sender: str, recipients: list[str], body: str, kind: str) -> list[MessageInfo]:
        rows = [Message(team_id=team.id, sender=sender, recipient=r, kind=kind, body=body, author_user_id=who.user_id,
                        author_token_id=who.token_id) for r in recipients]

        def insert(session: Session) -> None:
            session.add_all(rows)
            session.flush()
            for row in rows:
                session.refresh(row)

        await self._store.run(insert)
        roles = await self._roles(team.id)
        for recipient in recipients:
            if recipient != LEAD:
                member = await self._store.get(Member, recipient)
                if member is not None:
                    await self._mirror(member)
                self._wake(recipient)
        return [_message_info(row, roles) for row in rows]

    def _wake(self, member_id: str) -> None:
        """Wake a member's loop (at once if idle; after its turn if busy)."""
        if (live := self._live.get(member_id)) is not None:
            live.wake.set()

    # -- store helpers --------------------------------------------------------------------

    async def _update(self, member_id: str, **values: object) -> None:
        await self._store.update(Member, member_id, **values)

    async def _update_team(self, team_id: str, **values: object) -> None:
        await self._store.update(Team, team_id, **values)


# -- identities and shapes ------------------------------------------------------------------


_SANDBOX_WORK = ["sandbox:create", "sandbox:exec", "sandbox:files"]


def _run_of(team: Team, run_id: str, scopes: list[str], **extra: str | None) -> Identity:
    """The lead's attribution, as a run of its own: the team's (its shared sandbox) or a member's."""
    return Identity(workspace_id=team.workspace_id, project_id=team.project_id, user_id=team.user_id, run_id=run_id,
                    scopes=scopes, **extra)


def _owner(member: Member, team: Team) -> Identity:
    """What dockyard acts as for a member's own sandbox work."""
    return _run_of(team, member.id, _SANDBOX_WORK)


def _team_owner(team: Team) -> Identity:
    return _run_of(team, team.id, _SANDBOX_WORK)


def _acting(member: Member, team: Team, live: _Live) -> Identity:
    """The member as it calls tools in process: its token's identity."""
    return _run_of(team, member.id, list(live.scopes), token_id=live.token_id, sandbox_id=member.sandbox_id)


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
        "DOCKYARD_INBOX": f"/workspace/{_INBOX_DIR}/{member.role}.jsonl",
        "DOCKYARD_PLAN_STATUS": (member.plan_status or "none") if member.plan_mode else "off",
        "DOCKYARD_TOKEN": live.token or "",
    }


def _as_text(messages: list[Message], roles: dict[str, str]) -> str:
    return "\n\n".join(f"[{m.kind} from {roles.get(m.sender, m.sender)} (#{m.id})]\n{m.body}" for m in messages)


def _wire(message: Message, roles: dict[str, str] | None = None) -> dict[str, Any]:
    roles = roles or {}
    return {"id": message.id, "from": roles.get(message.sender, message.sender), "author": _author(message, roles),
            "kind": message.kind, "body": message.body, "at": message.created_at.isoformat()}


def _author(message: Message, roles: dict[str, str]) -> str:
    """Who wrote a message: the user, for the lead side (several users may lead one team), or
    the member's role."""
    if message.sender == LEAD:
        return message.author_user_id or LEAD
    return roles.get(message.sender, message.sender)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _team_info(team: Team, notice: str | None = None) -> TeamInfo:
    return TeamInfo(team_id=team.id, name=team.name, status=team.status, sandbox_id=team.sandbox_id, notice=notice)


def _member_info(member: Member, notice: str | None = None) -> MemberInfo:
    return MemberInfo(
        member_id=member.id, role=member.role, runner=member.runner, isolation=member.isolation, status=member.status,
        sandbox_id=member.sandbox_id, plan_mode=member.plan_mode, plan_status=member.plan_status, plan=member.plan,
        plan_feedback=member.plan_feedback, turns=member.turns, last_output=member.last_output, last_error=member.last_error,
        notice=notice,
    )


def _task_info(task: TeamTask, roles: dict[str, str]) -> TaskInfo:
    return TaskInfo(task_id=task.id, title=task.title, detail=task.detail, status=task.status,
                    owner=roles.get(task.owner, task.owner) if task.owner else None, result=task.result)


def _message_info(message: Message, roles: dict[str, str]) -> MessageInfo:
    assert message.id is not None
    return MessageInfo(
        message_id=message.id, sender=roles.get(message.sender, message.sender), author=_author(message, roles),
        recipient=roles.get(message.recipient, message.recipient),
        kind=message.kind, body=message.body, created_at=message.created_at.isoformat(), delivered=message.delivered_at is not None,
        delivered_at=_iso(message.delivered_at),
    )

