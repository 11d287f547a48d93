"""A team's messages: inboxes (rows, mirrored into sandboxes), sending, receipts and wake-ups.

A message is a row in its recipient's inbox. Sending it wakes the recipient's loop (an event,
not polling); the turn that takes it marks it delivered when it ends, which is the receipt the
sender sees. The lead has no loop: its reading its inbox is the receipt of what it received.
"""

from __future__ import annotations

import json
import logging

import anyio
from sqlmodel import Session, col, select

from dockyard.runtime.runtimes.sandboxes import SandboxService
from dockyard.runtime.substrate.actions import Action
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.errors import DockyardError, InvalidRequestError, SizeLimitError
from dockyard.runtime.substrate.models import Inbox, MessageInfo, MessagesSent
from dockyard.runtime.substrate.settings import Identity, TeamSettings
from dockyard.runtime.substrate.store import Member, MemberStatus, Message, Store, Team, utcnow
from dockyard.runtime.work.teams.access import INBOX, TeamAccess, owner
from dockyard.runtime.work.teams.views import LEAD, interrupted_notice, message_info, wire

__all__ = ["INBOX_DIR", "Doorbells", "Messaging"]

log = logging.getLogger(__name__)

INBOX_DIR = ".dockyard/inbox"
"""Where, under /workspace, a member's inbox is mirrored as `<role>.jsonl`."""


class Doorbells:
    """Wake-ups: one event per member loop, rung when there is work for it."""

    def __init__(self) -> None:
        self._bells: dict[str, anyio.Event] = {}

    def reset(self, member_id: str) -> anyio.Event:
        """A fresh bell for the member, rung by whatever arrives from now on."""
        bell = self._bells[member_id] = anyio.Event()
        return bell

    def current(self, member_id: str) -> anyio.Event:
        """The member's bell (made if it has none), rung or not."""
        return self._bells.setdefault(member_id, anyio.Event())

    def ring(self, member_id: str) -> None:
        """Wake a member's loop (at once if idle; after its turn if busy)."""
        if (bell := self._bells.get(member_id)) is not None:
            bell.set()

    def forget(self, member_id: str) -> None:
        """Drop a stopped member's bell."""
        self._bells.pop(member_id, None)


class Messaging:
    """Carries messages between a team's lead and members, and mirrors inboxes into sandboxes."""

    def __init__(
        self, limits: TeamSettings, store: Store, audit: AuditLog, sandboxes: SandboxService, access: TeamAccess
    ) -> None:
        self._limits = limits
        self._store = store
        self._audit = audit
        self._sandboxes = sandboxes
        self._access = access
        self.bells = Doorbells()

    async def message(self, who: Identity, team_id: str, to: str, body: str) -> MessagesSent:
        """Append a message to one inbox (a member's by role, or the lead's) and wake its owner."""
        async with self._audit.record(
            who, Action.TEAM_MESSAGE, team_id, to=to, size=len(body.encode()), token_id=who.token_id
        ) as rec:
            team = await self._access.team(who, team_id, Action.TEAM_MESSAGE)
            sender = await self._access.party(who, team, Action.TEAM_MESSAGE)
            self.check_body(body)
            recipient = LEAD if to == LEAD else await self._access.reachable(team, to)
            if recipient == sender:
                raise InvalidRequestError("a member cannot message itself")
            notice = await self._access.notice_for(who, team)  # as it stood when the lead wrote
            sent = await self.send(who, team, sender, [recipient], body, "message")
            rec.detail["message_ids"] = [m.message_id for m in sent]
        return MessagesSent(messages=sent, notice=notice)

    async def broadcast(self, who: Identity, team_id: str, body: str) -> MessagesSent:
        """Append a message to every member's inbox (but the sender's) and wake them all."""
        async with self._audit.record(
            who, Action.TEAM_BROADCAST, team_id, size=len(body.encode()), token_id=who.token_id
        ) as rec:
            team = await self._access.team(who, team_id, Action.TEAM_BROADCAST)
            sender = await self._access.party(who, team, Action.TEAM_BROADCAST)
            self.check_body(body)
            members = await self._store.run(
                lambda s: list(
                    s.exec(
                        select(Member).where(
                            Member.team_id == team.id,
                            col(Member.status).not_in([MemberStatus.STOPPED, MemberStatus.FAILED]),
                        )
                    ).all()
                )
            )
            recipients = [m.id for m in members if m.id != sender]
            if not recipients:
                raise InvalidRequestError("the team has no other member to broadcast to; team_spawn adds members")
            notice = await self._access.notice_for(who, team)
            sent = await self.send(who, team, sender, recipients, body, "broadcast")
            rec.detail["message_ids"] = [m.message_id for m in sent]
        return MessagesSent(messages=sent, notice=notice)

    async def inbox(self, who: Identity, team_id: str) -> Inbox:
        """Messages to the caller and the receipts of those it sent. The lead reading its
        inbox is the receipt of what it received."""
        team = await self._access.team(who, team_id, Action.TEAM_READ)
        me = await self._access.party(who, team, Action.TEAM_READ)

        marked = False

        def read(session: Session) -> tuple[list[Message], list[Message], list[Member]]:
            nonlocal marked
            received = list(
                session.exec(
                    select(Message).where(Message.team_id == team.id, Message.recipient == me).order_by(col(Message.id))
                ).all()
            )
            sent = list(
                session.exec(
                    select(Message).where(Message.team_id == team.id, Message.sender == me).order_by(col(Message.id))
                ).all()
            )
            if me == LEAD:
                for message in received:
                    if message.delivered_at is None:
                        message.taken_at = message.delivered_at = utcnow()
                        session.add(message)
                        marked = True
            members = list(session.exec(select(Member).where(Member.team_id == team.id)).all())
            return received, sent, members

        received, sent, members = await self._store.run(read)
        if marked:  # the senders' receipts changed
            await self._access.changed(team, INBOX)
        roles = {m.id: m.role for m in members}
        return Inbox(
            received=[message_info(m, roles) for m in received],
            sent=[message_info(m, roles) for m in sent],
            notice=interrupted_notice(members) if me == LEAD else None,
        )

    def check_body(self, body: str) -> None:
        """Refuse an empty text, or one over the team's cap."""
        size = len(body.encode())
        if not body.strip():
            raise InvalidRequestError("the message is empty")
        if size > self._limits.message_max_bytes:
            raise SizeLimitError(f"the message is {size} bytes; the cap is {self._limits.message_max_bytes} bytes")

    async def send(
        self, who: Identity, team: Team, sender: str, recipients: list[str], body: str, kind: str
    ) -> list[MessageInfo]:
        """Append one message per recipient, mirror the members' inboxes and wake them."""
        rows = [
            Message(
                team_id=team.id,
                sender=sender,
                recipient=r,
                kind=kind,
                body=body,
                author_user_id=who.user_id,
                author_token_id=who.token_id,
            )
            for r in recipients
        ]

        def insert(session: Session) -> None:
            session.add_all(rows)
            session.flush()
            for row in rows:
                session.refresh(row)

        await self._store.run(insert)
        roles = await self._access.roles(team.id)
        for recipient in recipients:
            if recipient != LEAD:
                member = await self._store.get(Member, recipient)
                if member is not None:
                    await self.mirror(member)
                self.bells.ring(recipient)
        await self._access.changed(team, INBOX)
        return [message_info(row, roles) for row in rows]

    async def mirror(self, member: Member) -> None:
        """Write the member's inbox, as JSON lines, into its sandbox."""
        if member.sandbox_id is None:
            return
        roles = await self._access.roles(member.team_id)
        rows = await self._store.run(
            lambda s: list(
                s.exec(select(Message).where(Message.recipient == member.id).order_by(col(Message.id))).all()
            )
        )
        content = "".join(json.dumps(wire(m, roles)) + "\n" for m in rows)
        try:
            await self._sandboxes.write_file(
                owner(member, await self._access.team_row(member.team_id)),
                member.sandbox_id,
                f"{INBOX_DIR}/{member.role}.jsonl",
                content,
                "utf-8",
            )
        except DockyardError as exc:
            log.info("inbox mirror of %s not written: %s", member.id, exc)

    async def take(self, member: Member) -> list[Message]:
        """Every message not yet taken by the member's turns, marked taken in the same transaction."""

        def take(session: Session) -> list[Message]:
            rows = list(
                session.exec(
                    select(Message)
                    .where(Message.recipient == member.id, col(Message.taken_at).is_(None))
                    .order_by(col(Message.id))
                ).all()
            )
            now = utcnow()
            for row in rows:
                row.taken_at = now
                session.add(row)
            return rows

        return await self._store.run(take)
