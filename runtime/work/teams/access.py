"""Who is who in a team: the caller's place (lead or member), members by role, and the
identities dockyard acts as for a team's sandbox work."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence

import anyio
from sqlmodel import col, select

from dockyard.runtime.substrate.actions import Action, Scope
from dockyard.runtime.substrate.errors import InvalidRequestError, NotFoundError
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import Member, MemberStatus, Store, Team, TeamStatus
from dockyard.runtime.substrate.tokens import TokenService
from dockyard.runtime.work.teams.views import LEAD, interrupted_notice

__all__ = ["INBOX", "TEAM", "TeamAccess", "is_member", "owner", "run_of", "team_owner"]

log = logging.getLogger(__name__)

TEAM = "team"
"""A change of a team's members, tasks, plans or status."""
INBOX = "inbox"
"""A change of a team's messages: sent, taken by a turn, delivered."""

# What a lead may still do with a team it shut down.
_AFTER_SHUTDOWN = (Action.TEAM_TASKS, Action.TEAM_READ, Action.TEAM_SHUTDOWN, Action.TEAM_CLEANUP)
_SANDBOX_WORK = [Scope.SANDBOX_CREATE, Scope.SANDBOX_EXEC, Scope.SANDBOX_FILES]


class TeamAccess:
    """Finds teams and members in the caller's reach, and the caller's place in a team."""

    def __init__(self, store: Store, tokens: TokenService) -> None:
        self._store = store
        self._tokens = tokens
        # Told the id and workspace of a team that changed, and what changed: "team" (members,
        # tasks, plans, its status) or "inbox" (a message sent, taken or delivered).
        self.on_change: Callable[[str, str, str], Awaitable[None]] | None = None

    async def changed(self, team: Team | str, *parts: str) -> None:
        """Tell of a change of a team (by row or id): `parts` among "team" and "inbox"."""
        if self.on_change is None:
            return
        # Shielded: told after the change is stored, so a cancel here would make a step that
        # happened look as if it had not (and leave what it took to nobody).
        with anyio.CancelScope(shield=True):
            row = team if isinstance(team, Team) else await self._store.get(Team, team)
            if row is None:
                return
            for part in parts:
                try:
                    await self.on_change(row.id, row.workspace_id, part)
                except Exception:  # a subscriber's trouble must not stop the team
                    log.exception("team %s: change notification failed", row.id)

    async def team(self, who: Identity, team_id: str, action: Action) -> Team:
        """A team of the caller's workspace, else a refusal on the record."""
        team = await self._store.get(Team, team_id)
        if team is None or team.workspace_id != who.workspace_id:
            await self._tokens.deny(who, action, "no such team in the caller's reach", team_id)
            raise NotFoundError(f"unknown team '{team_id}'; team_create returns the ids of your teams")
        return team

    async def party(self, who: Identity, team: Team, action: Action) -> str:
        """The caller's place in the team: 'lead', or its member id. A member is who dockyard
        spawned: the caller must present the very token dockyard minted for that member."""
        if is_member(who):
            assert who.run_id is not None
            member = await self._store.get(Member, who.run_id)
            if member is None or member.team_id != team.id:
                raise await self._tokens.deny(who, action, "this token belongs to a member of another team", team.id)
            if member.token_id is None or not hmac.compare_digest(
                member.token_id.encode(), (who.token_id or "-").encode()
            ):
                raise await self._tokens.deny(
                    who, action, f"this token is not the one dockyard issued to '{member.role}'", team.id
                )
            if member.status == MemberStatus.STOPPED:
                raise await self._tokens.deny(who, action, f"'{member.role}' was shut down", team.id)
            return member.id
        if who.allows(Scope.TEAM_LEAD):
            if team.status != TeamStatus.ACTIVE and action not in _AFTER_SHUTDOWN:
                raise InvalidRequestError(
                    f"team '{team.id}' is shut down; team_cleanup forgets it, team_create starts a new one"
                )
            return LEAD
        raise await self._tokens.deny(
            who, action, "team tools need the team:lead scope (the lead) or a member's token", team.id
        )

    async def lead_of(self, who: Identity, team_id: str, action: Action) -> Team:
        """The team, if the caller is its lead."""
        team = await self.team(who, team_id, action)
        if await self.party(who, team, action) != LEAD:
            raise await self._tokens.deny(
                who, action, f"{action.replace('.', '_')} is for the team's lead only", team.id
            )
        return team

    async def members(self, team_id: str) -> list[Member]:
        """Every member of a team, in the order they joined."""
        return await self._store.run(
            lambda s: list(
                s.exec(select(Member).where(Member.team_id == team_id).order_by(col(Member.created_at))).all()
            )
        )

    async def member(self, team: Team, ref: str) -> Member:
        """A member of `team` by role or id."""
        members = await self.members(team.id)
        for member in members:
            if ref in (member.role, member.id):
                return member
        roles = ", ".join(m.role for m in members) or "none yet"
        raise NotFoundError(f"unknown member '{ref}' in team '{team.id}'; members: {roles} (or 'lead')")

    async def reachable(self, team: Team, ref: str) -> str:
        """A member that can still take messages."""
        member = await self.member(team, ref)
        if member.status == MemberStatus.STOPPED:
            raise InvalidRequestError(f"'{member.role}' was shut down and takes no more messages")
        if member.status == MemberStatus.FAILED:
            raise InvalidRequestError(
                f"'{member.role}' could not start ({member.last_error}); spawn it again under another role"
            )
        return member.id

    async def role(self, party: str) -> str:
        """A party's name as others see it: 'lead' or the member's role."""
        if party == LEAD:
            return LEAD
        member = await self._store.get(Member, party)
        return member.role if member else party

    async def roles(self, team_id: str) -> dict[str, str]:
        """Each member's id and role."""
        return {m.id: m.role for m in await self.members(team_id)}

    async def team_row(self, team_id: str) -> Team:
        """A team known to exist."""
        team = await self._store.get(Team, team_id)
        assert team is not None
        return team

    async def notice_for(self, who: Identity, team: Team) -> str | None:
        """The restart notice, for the lead (members are not told)."""
        if is_member(who):
            return None
        return interrupted_notice(await self.members(team.id))


def is_member(who: Identity) -> bool:
    """Whether the caller acts as a team member (with a member's token)."""
    return bool(who.run_id and who.run_id.startswith("mem_") and who.allows(Scope.TEAM_MEMBER))


def run_of(team: Team, run_id: str, scopes: Sequence[str], **extra: str | None) -> Identity:
    """The lead's attribution, as a run of its own: the team's (its shared sandbox) or a member's."""
    return Identity(
        workspace_id=team.workspace_id,
        project_id=team.project_id,
        user_id=team.user_id,
        run_id=run_id,
        scopes=list(scopes),
        **extra,
    )


def owner(member: Member, team: Team) -> Identity:
    """What dockyard acts as for a member's own sandbox work."""
    return run_of(team, member.id, _SANDBOX_WORK)


def team_owner(team: Team) -> Identity:
    """What dockyard acts as for the team's shared sandbox."""
    return run_of(team, team.id, _SANDBOX_WORK)
