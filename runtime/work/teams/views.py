"""What callers see of a team: its rows as results, messages on the wire, the restart notice."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from dockyard.runtime.substrate.models import MemberInfo, MessageInfo, TaskInfo, TeamInfo
from dockyard.runtime.substrate.store import Member, MemberStatus, Message, Team, TeamTask

__all__ = ["LEAD", "as_text", "interrupted_notice", "member_info", "message_info", "task_info", "team_info", "wire"]

LEAD = "lead"
"""The lead's side of a team, as a sender or a recipient."""


def interrupted_notice(members: Iterable[Member]) -> str | None:
    """The lead's restart notice: the members a restart left ready (they were busy) until a
    message resumes them."""
    roles = sorted(m.role for m in members if m.status == MemberStatus.READY)
    if not roles:
        return None
    return f"Server was restarted. Teammates interrupted: {', '.join(roles)}. Use team_message to resume."


def as_text(messages: list[Message], roles: dict[str, str]) -> str:
    """Messages as one turn's text."""
    return "\n\n".join(f"[{m.kind} from {roles.get(m.sender, m.sender)} (#{m.id})]\n{m.body}" for m in messages)


def wire(message: Message, roles: dict[str, str] | None = None) -> dict[str, Any]:
    """A message as one JSON line of an inbox (its mirror, a script member's stdin)."""
    roles = roles or {}
    return {
        "id": message.id,
        "from": roles.get(message.sender, message.sender),
        "author": _author(message, roles),
        "kind": message.kind,
        "body": message.body,
        "at": message.created_at.isoformat(),
    }


def _author(message: Message, roles: dict[str, str]) -> str:
    """Who wrote a message: the user, for the lead side (several users may lead one team), or
    the member's role."""
    if message.sender == LEAD:
        return message.author_user_id or LEAD
    return roles.get(message.sender, message.sender)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def team_info(team: Team, notice: str | None = None) -> TeamInfo:
    """A team as a result."""
    return TeamInfo(team_id=team.id, name=team.name, status=team.status, sandbox_id=team.sandbox_id, notice=notice)


def member_info(member: Member, notice: str | None = None) -> MemberInfo:
    """A member as a result."""
    return MemberInfo(
        member_id=member.id,
        role=member.role,
        runner=member.runner,
        isolation=member.isolation,
        status=member.status,
        sandbox_id=member.sandbox_id,
        plan_mode=member.plan_mode,
        plan_status=member.plan_status,
        plan=member.plan,
        plan_feedback=member.plan_feedback,
        turns=member.turns,
        last_output=member.last_output,
        last_error=member.last_error,
        notice=notice,
    )


def task_info(task: TeamTask, roles: dict[str, str]) -> TaskInfo:
    """A task as a result, its owner by role."""
    return TaskInfo(
        task_id=task.id,
        title=task.title,
        detail=task.detail,
        status=task.status,
        owner=roles.get(task.owner, task.owner) if task.owner else None,
        result=task.result,
    )


def message_info(message: Message, roles: dict[str, str]) -> MessageInfo:
    """A message as a result, with its receipt."""
    assert message.id is not None
    return MessageInfo(
        message_id=message.id,
        sender=roles.get(message.sender, message.sender),
        author=_author(message, roles),
        recipient=roles.get(message.recipient, message.recipient),
        kind=message.kind,
        body=message.body,
        created_at=message.created_at.isoformat(),
        delivered=message.delivered_at is not None,
        delivered_at=_iso(message.delivered_at),
    )
