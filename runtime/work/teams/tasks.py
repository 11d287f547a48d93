"""A team's shared task list (claimed atomically, never by two members) and its members' plans.

Each step reads its row and moves it along its lifecycle (`states`) in one transaction, so two
members claiming one task, or a lead answering one plan twice, cannot both succeed.
"""

from __future__ import annotations

import secrets

from sqlmodel import Session, col, select

from dockyard.runtime.substrate.actions import Action
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.errors import InvalidRequestError
from dockyard.runtime.substrate.models import MemberInfo, TaskInfo, TasksAdded
from dockyard.runtime.substrate.settings import Identity, TeamSettings
from dockyard.runtime.substrate.store import Member, Message, Store, TaskStatus, TeamTask, utcnow
from dockyard.runtime.work.teams.access import INBOX, TEAM, TeamAccess
from dockyard.runtime.work.teams.messaging import Messaging
from dockyard.runtime.work.teams.states import (
    APPROVE_PLAN,
    CLAIM_TASK,
    FAIL_TASK,
    FINISH_TASK,
    PROPOSE_PLAN,
    REJECT_PLAN,
)
from dockyard.runtime.work.teams.views import LEAD, member_info, task_info

__all__ = ["Plans", "TaskList"]


class TaskList:
    """The shared task list: the lead and members add tasks, members claim and finish them."""

    def __init__(
        self, limits: TeamSettings, store: Store, audit: AuditLog, access: TeamAccess, messaging: Messaging
    ) -> None:
        self._limits = limits
        self._store = store
        self._audit = audit
        self._access = access
        self._messaging = messaging

    async def add(self, who: Identity, team_id: str, tasks: list[tuple[str, str | None]]) -> TasksAdded:
        """Add open tasks to the shared list."""
        async with self._audit.record(
            who, Action.TEAM_ADD_TASKS, team_id, count=len(tasks), token_id=who.token_id
        ) as rec:
            team = await self._access.team(who, team_id, Action.TEAM_ADD_TASKS)
            author = await self._access.party(who, team, Action.TEAM_ADD_TASKS)
            if not tasks or any(not title.strip() for title, _ in tasks):
                raise InvalidRequestError("give at least one task, each with a title")
            rows = [
                TeamTask(
                    id=f"task_{secrets.token_hex(6)}",
                    team_id=team.id,
                    title=title.strip()[:500],
                    detail=detail,
                    created_by=author,
                )
                for title, detail in tasks
            ]

            def insert(session: Session) -> None:
                present = len(session.exec(select(TeamTask.id).where(TeamTask.team_id == team.id)).all())
                if present + len(rows) > self._limits.max_tasks:
                    raise InvalidRequestError(f"a team holds at most {self._limits.max_tasks} tasks; it has {present}")
                session.add_all(rows)

            await self._store.run(insert)
            rec.detail["task_ids"] = [row.id for row in rows]
        await self._access.changed(team, TEAM)
        return TasksAdded(tasks=[task_info(row, {}) for row in rows])

    async def claim(self, who: Identity, team_id: str, task_id: str | None) -> TaskInfo:
        """Claim an open task for the calling member, atomically: never two owners."""
        async with self._audit.record(who, Action.TEAM_CLAIM, task_id or team_id, token_id=who.token_id) as rec:
            team = await self._access.team(who, team_id, Action.TEAM_CLAIM)
            me = await self._access.party(who, team, Action.TEAM_CLAIM)
            if me == LEAD:
                raise InvalidRequestError(
                    "members claim tasks; the lead adds them (team_add_tasks) and reads them (team_tasks)"
                )

            def take(session: Session) -> TeamTask:
                query = select(TeamTask).where(TeamTask.team_id == team.id)
                if task_id is not None:
                    row = session.exec(query.where(TeamTask.id == task_id)).first()
                    if row is None:
                        raise InvalidRequestError(f"unknown task '{task_id}' in this team; team_tasks lists them")
                else:
                    row = session.exec(
                        query.where(TeamTask.status == TaskStatus.OPEN).order_by(
                            col(TeamTask.created_at), col(TeamTask.id)
                        )
                    ).first()
                    if row is None:
                        raise InvalidRequestError("no open task is left to claim")

                def taken(state: str | None) -> str:
                    holder = session.get(Member, row.owner) if row.owner else None
                    return (
                        f"task '{task_id}' is {state}"
                        + (f" by '{holder.role}'" if holder else "")
                        + "; claim an open one"
                    )

                CLAIM_TASK.apply(row, taken)
                row.owner, row.claimed_at = me, utcnow()
                session.add(row)
                return row

            claimed = await self._store.run(take)
            rec.target = claimed.id
        await self._access.changed(team, TEAM)
        return task_info(claimed, {me: await self._access.role(me)})

    async def complete(self, who: Identity, team_id: str, task_id: str, result: str, failed: bool) -> TaskInfo:
        """Finish a task the calling member holds, with its result."""
        async with self._audit.record(who, Action.TEAM_COMPLETE, task_id, failed=failed, token_id=who.token_id):
            team = await self._access.team(who, team_id, Action.TEAM_COMPLETE)
            me = await self._access.party(who, team, Action.TEAM_COMPLETE)
            self._messaging.check_body(result)

            def finish(session: Session) -> TeamTask:
                row = session.get(TeamTask, task_id)
                if row is None or row.team_id != team.id:
                    raise InvalidRequestError(f"unknown task '{task_id}' in this team; team_tasks lists them")
                refusal = f"task '{task_id}' is not claimed by you (it is {row.status}); claim it first"
                if row.owner != me:
                    raise InvalidRequestError(refusal)
                (FAIL_TASK if failed else FINISH_TASK).apply(row, refusal)
                row.result, row.finished_at = result, utcnow()
                session.add(row)
                return row

            done = await self._store.run(finish)
        await self._access.changed(team, TEAM)
        return task_info(done, {me: await self._access.role(me)})


class Plans:
    """Plan mode: a member proposes its plan, the lead approves it (the member may then act)
    or rejects it with feedback (the member may propose again)."""

    def __init__(self, store: Store, audit: AuditLog, access: TeamAccess, messaging: Messaging) -> None:
        self._store = store
        self._audit = audit
        self._access = access
        self._messaging = messaging

    async def propose(self, who: Identity, team_id: str, plan: str) -> MemberInfo:
        """A member in plan mode hands its plan to the lead, who approves or rejects it."""
        async with self._audit.record(
            who, Action.TEAM_PROPOSE_PLAN, team_id, size=len(plan.encode()), token_id=who.token_id
        ) as rec:
            team = await self._access.team(who, team_id, Action.TEAM_PROPOSE_PLAN)
            me = await self._access.party(who, team, Action.TEAM_PROPOSE_PLAN)
            if me == LEAD:
                raise InvalidRequestError("the lead approves plans (team_approve_plan); members propose them")
            self._messaging.check_body(plan)
            rec.target = me

            def propose(session: Session) -> Member:
                row = session.get(Member, me)
                assert row is not None
                if not row.plan_mode:
                    raise InvalidRequestError(f"'{row.role}' is not in plan mode: it may act without a plan")
                PROPOSE_PLAN.apply(row, "your plan is already approved: go ahead")
                row.plan, row.plan_feedback = plan, None
                session.add(row)
                session.add(
                    Message(
                        team_id=team.id,
                        sender=row.id,
                        recipient=LEAD,
                        kind="plan",
                        body=plan,
                        author_user_id=who.user_id,
                        author_token_id=who.token_id,
                    )
                )
                return row

            member = await self._store.run(propose)
        await self._access.changed(team, TEAM, INBOX)
        return member_info(member)

    async def answer(
        self, who: Identity, team_id: str, member_ref: str, approve: bool, feedback: str | None
    ) -> MemberInfo:
        """Approve a member's pending plan (it may act from its next turn) or reject it with
        feedback (it may propose again); either way the answer wakes it."""
        async with self._audit.record(
            who, Action.TEAM_APPROVE_PLAN, team_id, member=member_ref, approve=approve, token_id=who.token_id
        ) as rec:
            team = await self._access.lead_of(who, team_id, Action.TEAM_APPROVE_PLAN)
            member = await self._access.member(team, member_ref)
            rec.target = member.id
            text = feedback.strip() if feedback else ""
            if approve:
                body = "Your plan was approved. Go ahead with it." + (f" Feedback: {text}" if text else "")
            else:
                body = f"Your plan was rejected. Feedback: {text or 'none given'}. Revise it and propose again with team_propose_plan."

            def decide(session: Session) -> Member:
                row = session.get(Member, member.id)
                assert row is not None
                (APPROVE_PLAN if approve else REJECT_PLAN).apply(
                    row,
                    lambda state: (
                        f"'{row.role}' has no plan waiting for approval (its plan status: {state or 'none yet'})"
                    ),
                )
                row.plan_feedback = text or None
                session.add(row)
                session.add(
                    Message(
                        team_id=team.id,
                        sender=LEAD,
                        recipient=member.id,
                        kind="plan",
                        body=body,
                        author_user_id=who.user_id,
                        author_token_id=who.token_id,
                    )
                )
                return row

            member = await self._store.run(decide)
        await self._access.changed(team, TEAM, INBOX)
        self._messaging.bells.ring(member.id)  # an approved member's next turn gets a token that may act
        return member_info(member, await self._access.notice_for(who, team))
