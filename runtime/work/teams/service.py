"""The team service: team and member rows, spawning, shutting down and forgetting, and the
rooms that carry the rest (messaging, the task list, plans, the member loop)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
from sqlalchemy import delete
from sqlmodel import Session, col, func, select

from dockyard.runtime.runtimes.sandboxes import SandboxService
from dockyard.runtime.substrate.actions import Action
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.errors import DockyardError, InvalidRequestError
from dockyard.runtime.substrate.listings import TeamPage, TeamRow, Window
from dockyard.runtime.substrate.models import (
    Inbox,
    MemberInfo,
    MessagesSent,
    TaskInfo,
    TasksAdded,
    TeamForgotten,
    TeamInfo,
    TeamTasksPage,
    TeamView,
)
from dockyard.runtime.substrate.runs import link_run
from dockyard.runtime.substrate.settings import Identity, Settings
from dockyard.runtime.substrate.store import (
    Member,
    MemberStatus,
    Message,
    RunLink,
    Sandbox,
    SandboxStatus,
    Store,
    TaskStatus,
    Team,
    TeamStatus,
    TeamTask,
)
from dockyard.runtime.substrate.tokens import TokenService
from dockyard.runtime.work.runners import Runners
from dockyard.runtime.work.teams.access import INBOX, TEAM, TeamAccess, is_member, owner, team_owner
from dockyard.runtime.work.teams.members import MemberLoop
from dockyard.runtime.work.teams.messaging import Messaging
from dockyard.runtime.work.teams.pages import fitted
from dockyard.runtime.work.teams.states import INTERRUPT_MEMBER, SHUT_DOWN_TEAM, STOP_MEMBER
from dockyard.runtime.work.teams.tasks import Plans, TaskList
from dockyard.runtime.work.teams.views import LEAD, interrupted_notice, member_info, task_info, team_info

__all__ = ["ISOLATIONS", "TeamService"]

log = logging.getLogger(__name__)

ISOLATIONS = ("shared", "own")


class TeamService:
    """Creates teams and members, and hands messages, tasks, plans and turns to their rooms."""

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
        self._limits = settings.teams
        self._store = store
        self._audit = audit
        self._sandboxes = sandboxes
        self._tokens = tokens
        self._access = TeamAccess(store, tokens)
        self._messaging = Messaging(settings.teams, store, audit, sandboxes, self._access)
        self._tasks = TaskList(settings.teams, store, audit, self._access, self._messaging)
        self._plans = Plans(store, audit, self._access, self._messaging)
        self._loop = MemberLoop(settings, store, audit, sandboxes, runners, tokens, self._access, self._messaging, self)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Mark members a stop interrupted, restart every member's loop, then hold the loops."""

        def recover(session: Session) -> list[tuple[Member, bool]]:
            loops: list[tuple[Member, bool]] = []
            teams = list(session.exec(select(Team.id).where(Team.status == TeamStatus.ACTIVE)).all())
            members = session.exec(select(Member).where(col(Member.team_id).in_(teams))).all()
            for member in members:
                if INTERRUPT_MEMBER.allows(member.status):
                    INTERRUPT_MEMBER.apply(member)  # the lead's notice names it until it works again
                    session.add(member)
                    # What its interrupted turn had taken goes back to its inbox, unprocessed.
                    for message in session.exec(
                        select(Message).where(
                            Message.recipient == member.id,
                            col(Message.taken_at).is_not(None),
                            col(Message.delivered_at).is_(None),
                        )
                    ).all():
                        message.taken_at = None
                        session.add(message)
                if member.status in (MemberStatus.IDLE, MemberStatus.READY):
                    loops.append((member, member.status == MemberStatus.READY))
            return loops

        await self._loop.run(await self._store.run(recover), task_status=task_status)

    # -- the lead's tools -----------------------------------------------------------------

    async def create(self, who: Identity, name: str) -> TeamInfo:
        """A new, empty team led by the caller."""
        name = name.strip()
        if not name or len(name) > 100:
            raise InvalidRequestError("a team needs a name of 1 to 100 characters")
        team = Team(
            id=f"team_{secrets.token_hex(6)}",
            name=name,
            workspace_id=who.workspace_id,
            project_id=who.project_id,
            user_id=who.user_id,
            lead_token_id=who.token_id,
        )
        async with self._audit.record(who, Action.TEAM_CREATE, team.id, name=name, token_id=who.token_id):

            def insert(session: Session) -> None:
                session.add(team)
                link_run(session, team.id, who.run_id)  # its shared sandbox counts in the lead's run

            await self._store.run(insert)
        return team_info(team)

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
        async with self._audit.record(
            who,
            Action.TEAM_SPAWN,
            team_id,
            role=role,
            runner=runner,
            isolation=isolation,
            plan_mode=plan_mode,
            token_id=who.token_id,
        ) as rec:
            team = await self._access.lead_of(who, team_id, Action.TEAM_SPAWN)
            role = role.strip()
            if not role or len(role) > 64 or role == LEAD or not all(c.isalnum() or c in "-_." for c in role):
                raise InvalidRequestError("a role is 1 to 64 letters, digits, '-', '_' or '.', and not 'lead'")
            if isolation not in ISOLATIONS:
                raise InvalidRequestError(f"unknown isolation '{isolation}'; allowed: shared (the team's sandbox), own")
            if runner not in self._settings.runners:
                raise InvalidRequestError(
                    f"unknown runner '{runner}'; allowed: {', '.join(sorted(self._settings.runners))}"
                )
            if not prompt.strip():
                raise InvalidRequestError("a member needs a prompt: its task (for the script runner, its script)")
            member = Member(
                id=f"mem_{secrets.token_hex(6)}",
                team_id=team.id,
                role=role,
                runner=runner,
                isolation=isolation,
                prompt=prompt,
                plan_mode=plan_mode,
            )
            rec.target = member.id

            def insert(session: Session) -> None:
                others = session.exec(select(Member).where(Member.team_id == team.id)).all()
                if any(other.role == role for other in others):
                    raise InvalidRequestError(f"the team already has a member with role '{role}'; pick another role")
                if len(others) >= self._limits.max_members:
                    raise InvalidRequestError(f"the team is at its limit of {self._limits.max_members} members")
                session.add(member)
                link_run(session, member.id, who.run_id)  # a child of the lead's run: counted in its tree

            await self._store.run(insert)
        await self._access.changed(team, TEAM)
        self._loop.start(member, wait_first=False)
        return member_info(member)

    @property
    def on_change(self) -> Callable[[str, str, str], Awaitable[None]] | None:
        """Told the id and workspace of a team that changed, and what: "team" (members, tasks,
        plans, status) or "inbox" (messages sent, taken or delivered)."""
        return self._access.on_change

    @on_change.setter
    def on_change(self, callback: Callable[[str, str, str], Awaitable[None]] | None) -> None:
        self._access.on_change = callback

    async def may_read(self, who: Identity, team_id: str, action: Action) -> None:
        """Raise (and audit) unless the caller is the team's lead or one of its members."""
        team = await self._access.team(who, team_id, action)
        await self._access.party(who, team, action)

    async def approve_plan(
        self, who: Identity, team_id: str, member_ref: str, approve: bool, feedback: str | None
    ) -> MemberInfo:
        """Approve a member's pending plan (it may act from its next turn) or reject it with
        feedback (it may propose again); either way the answer wakes it."""
        return await self._plans.answer(who, team_id, member_ref, approve, feedback)

    async def shutdown(self, who: Identity, team_id: str) -> TeamView:
        """Stop every member (a running turn is killed), revoke their tokens and give their
        sandboxes back to the pool."""
        async with self._audit.record(who, Action.TEAM_SHUTDOWN, team_id, token_id=who.token_id):
            team = await self._access.lead_of(who, team_id, Action.TEAM_SHUTDOWN)
            await self._tokens.may_end(who, team.user_id, Action.TEAM_SHUTDOWN, team.id, "team")
            await self._stop_all(team)
        return await self.view(who, team_id)

    async def cleanup(self, who: Identity, team_id: str) -> TeamForgotten:
        """Shut the team down if it is not, then forget it: members, inboxes (rows and mirror
        files), tasks and the team itself. The audit keeps the record of what happened."""
        async with self._audit.record(who, Action.TEAM_CLEANUP, team_id, token_id=who.token_id) as rec:
            team = await self._access.lead_of(who, team_id, Action.TEAM_CLEANUP)
            await self._tokens.may_end(who, team.user_id, Action.TEAM_CLEANUP, team.id, "team")
            await self._stop_all(team)

            def forget(session: Session) -> dict[str, int]:
                counts = {
                    "messages": len(session.exec(select(Message.id).where(Message.team_id == team.id)).all()),
                    "tasks": len(session.exec(select(TeamTask.id).where(TeamTask.team_id == team.id)).all()),
                    "members": len(session.exec(select(Member.id).where(Member.team_id == team.id)).all()),
                }
                for model, column in (
                    (Message, Message.team_id),
                    (TeamTask, TeamTask.team_id),
                    (Member, Member.team_id),
                    (Team, Team.id),
                ):
                    session.execute(delete(model).where(col(column) == team.id))
                return counts

            counts = await self._store.run(forget)
            rec.detail.update(counts)
        self._loop.forget_team(team.id)
        await self._access.changed(team, TEAM, INBOX)  # it is gone: a read now says so
        return TeamForgotten(
            team_id=team.id, members=counts["members"], messages=counts["messages"], tasks=counts["tasks"]
        )

    # -- everyone's tools -----------------------------------------------------------------

    async def list_page(self, who: Identity, statuses: list[str] | None, limit: int, cursor: str | None) -> TeamPage:
        """A page of the teams in the caller's reach, newest first: a member sees its own team;
        a lead its workspace's, or with a token bound to a sandbox, the teams its run started."""
        window = Window("team_list", who, limit, cursor)
        member = await self._store.get(Member, who.run_id) if is_member(who) and who.run_id else None

        def query(session: Session) -> list[tuple[Team, int, int]]:
            stmt = select(Team).where(Team.workspace_id == who.workspace_id)
            if is_member(who):
                stmt = stmt.where(Team.id == (member.team_id if member is not None else None))
            elif who.sandbox_id is not None:
                below = select(RunLink.run_id).where(RunLink.ancestor_id == (who.run_id or who.sandbox_id))
                stmt = stmt.where(col(Team.id).in_(below))
            if statuses:
                stmt = stmt.where(col(Team.status).in_(statuses))
            teams = list(session.exec(window.apply(stmt, Team)).all())
            return [(team, *_counts(session, team.id)) for team in teams]

        found = await self._store.run(query)
        page, next_cursor = window.cut([team for team, _, _ in found])
        counts = {team.id: (members, open_tasks) for team, members, open_tasks in found}
        return TeamPage(
            teams=[
                TeamRow(
                    team_id=team.id,
                    name=team.name,
                    status=team.status,
                    lead_user_id=team.user_id,
                    members=counts[team.id][0],
                    open_tasks=counts[team.id][1],
                    created_at=team.created_at,
                )
                for team in page
            ],
            next_cursor=next_cursor,
        )

    async def view(self, who: Identity, team_id: str) -> TeamView:
        """Every member's status and the shared task list."""
        team = await self._access.team(who, team_id, Action.TEAM_TASKS)
        party = await self._access.party(who, team, Action.TEAM_TASKS)

        def read(session: Session) -> tuple[list[Member], list[TeamTask]]:
            members = list(
                session.exec(select(Member).where(Member.team_id == team.id).order_by(col(Member.created_at))).all()
            )
            tasks = list(
                session.exec(
                    select(TeamTask)
                    .where(TeamTask.team_id == team.id)
                    .order_by(col(TeamTask.created_at), col(TeamTask.id))
                ).all()
            )
            return members, tasks

        members, tasks = await self._store.run(read)
        roles = {m.id: m.role for m in members}
        notice = interrupted_notice(members) if party == LEAD else None
        return TeamView(
            team=team_info(team, notice),
            members=[member_info(m) for m in members],
            tasks=[task_info(t, roles) for t in tasks],
            notice=notice,
        )

    async def tasks_page(
        self, who: Identity, team_id: str, *, detail: bool, task_id: str | None, offset: int
    ) -> TeamTasksPage:
        """`view` within the result budget: summaries by default, the full text on request."""
        view = await self.view(who, team_id)
        return fitted(view, self._settings.results.budget_chars, detail=detail, task_id=task_id, offset=offset)

    async def message(self, who: Identity, team_id: str, to: str, body: str) -> MessagesSent:
        """Append a message to one inbox (a member's by role, or the lead's) and wake its owner."""
        return await self._messaging.message(who, team_id, to, body)

    async def broadcast(self, who: Identity, team_id: str, body: str) -> MessagesSent:
        """Append a message to every member's inbox (but the sender's) and wake them all."""
        return await self._messaging.broadcast(who, team_id, body)

    async def inbox(self, who: Identity, team_id: str) -> Inbox:
        """Messages to the caller and the receipts of those it sent."""
        return await self._messaging.inbox(who, team_id)

    async def add_tasks(self, who: Identity, team_id: str, tasks: list[tuple[str, str | None]]) -> TasksAdded:
        """Add open tasks to the shared list."""
        return await self._tasks.add(who, team_id, tasks)

    async def claim(self, who: Identity, team_id: str, task_id: str | None) -> TaskInfo:
        """Claim an open task for the calling member, atomically: never two owners."""
        return await self._tasks.claim(who, team_id, task_id)

    async def complete(self, who: Identity, team_id: str, task_id: str, result: str, failed: bool) -> TaskInfo:
        """Finish a task the calling member holds, with its result."""
        return await self._tasks.complete(who, team_id, task_id, result, failed)

    async def propose_plan(self, who: Identity, team_id: str, plan: str) -> MemberInfo:
        """A member in plan mode hands its plan to the lead, who approves or rejects it."""
        return await self._plans.propose(who, team_id, plan)

    # -- stopping -------------------------------------------------------------------------

    async def _stop_all(self, team: Team) -> None:
        members = await self._access.members(team.id)
        await self._loop.stop([m.id for m in members])
        for member in members:
            await self._tokens.revoke_run(member.id, "its team was shut down")
        await self._store.run(lambda s: _stop_members(s, team.id))
        # Every sandbox held for the team or one of its members goes back, including one whose
        # claim a stop cut short before the member row learnt of it.
        runs = {team.id: team_owner(team), **{m.id: owner(m, team) for m in members}}
        held = await self._store.run(
            lambda s: list(
                s.exec(
                    select(Sandbox).where(
                        col(Sandbox.run_id).in_(list(runs)),
                        Sandbox.workspace_id == team.workspace_id,
                        Sandbox.status == SandboxStatus.RUNNING,
                    )
                ).all()
            )
        )
        for sandbox in held:
            assert sandbox.run_id is not None
            await self._give_back(runs[sandbox.run_id], sandbox.id)
        await self._store.run(lambda s: _shut_down(s, team.id))
        await self._access.changed(team, TEAM)

    async def _give_back(self, owner: Identity, sandbox_id: str) -> None:
        try:
            await self._sandboxes.destroy(owner, sandbox_id)
        except DockyardError as exc:
            log.info("sandbox %s of a team: %s", sandbox_id, exc)


def _counts(session: Session, team_id: str) -> tuple[int, int]:
    """A team's members, and its tasks nobody has claimed yet."""
    members = session.exec(select(func.count()).select_from(Member).where(Member.team_id == team_id)).one()
    open_tasks = session.exec(
        select(func.count())
        .select_from(TeamTask)
        .where(TeamTask.team_id == team_id, TeamTask.status == TaskStatus.OPEN)
    ).one()
    return members, open_tasks


def _stop_members(session: Session, team_id: str) -> None:
    """Stop the team's members (those a first shutdown stopped stay as they are)."""
    for member in session.exec(select(Member).where(Member.team_id == team_id)).all():
        if STOP_MEMBER.allows(member.status):
            STOP_MEMBER.apply(member)
            session.add(member)


def _shut_down(session: Session, team_id: str) -> None:
    """Shut the team down (a second shutdown finds it done)."""
    team = session.get(Team, team_id)
    if team is not None and SHUT_DOWN_TEAM.allows(team.status):
        SHUT_DOWN_TEAM.apply(team)
        session.add(team)
