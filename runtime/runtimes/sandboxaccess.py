"""Whose a sandbox is, and as which user a caller works in it.

Every action on a sandbox starts here: a sandbox that is not the caller's is unknown to them
(and the attempt is audited as denied), a lost one says so, a paused one refuses work.
"""

from __future__ import annotations

from sqlmodel import Session, select

from dockyard.runtime.runtimes.provision import USER
from dockyard.runtime.substrate.actions import Action
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.docker import DockerBackend
from dockyard.runtime.substrate.errors import SandboxLostError, SandboxNotFoundError, SandboxPausedError
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import Member, Runtime, Sandbox, SandboxStatus, Store
from dockyard.runtime.substrate.tokens import TokenService

__all__ = ["SandboxAccess"]


class SandboxAccess:
    """Checks that a sandbox is the caller's and live, and names the user they work as."""

    def __init__(self, store: Store, audit: AuditLog, docker: DockerBackend, tokens: TokenService) -> None:
        self._store = store
        self._audit = audit
        self._docker = docker
        self._tokens = tokens

    async def owned(self, who: Identity, sandbox_id: str, action: Action) -> Sandbox:
        """The caller's live sandbox; a sandbox that is not theirs is unknown to them (and the
        attempt is audited as denied)."""
        row = await self._store.get(Sandbox, sandbox_id)
        if row is None or row.workspace_id != who.workspace_id or who.sandbox_id not in (None, sandbox_id):
            await self._audit.append(
                who,
                action,
                target=sandbox_id,
                outcome="denied",
                detail={"error": "no such sandbox in the caller's reach", "token_id": who.token_id},
            )
            raise SandboxNotFoundError(sandbox_id)
        if row.status == SandboxStatus.LOST:
            await self._tokens.revoke_sandbox(sandbox_id, "its sandbox was lost")
            raise SandboxLostError(sandbox_id, row.end_reason or "its container is gone")
        if row.status != SandboxStatus.RUNNING:
            raise SandboxNotFoundError(sandbox_id)
        if self._docker.paused_outside(row.container_id) and action != Action.SANDBOX_DESTROY:
            raise SandboxPausedError(sandbox_id)
        return row

    async def unix_user(self, who: Identity, sandbox_id: str) -> str:
        """The sandbox user `who` works as in `sandbox_id`: a team member's own user in its
        team's shared sandbox (assigned by the server when it joined), else the sandbox user."""
        if who.run_id and who.run_id.startswith("mem_"):
            member = await self._store.get(Member, who.run_id)
            if member is not None and member.sandbox_id == sandbox_id and member.unix_user:
                return member.unix_user
        return USER

    async def member_user(self, who: Identity, sandbox_id: str) -> str | None:
        """A member's own user in the sandbox, or None for the sandbox user."""
        user = await self.unix_user(who, sandbox_id)
        return None if user == USER else user

    async def seat_holder(self, sandbox_id: str, user: str) -> str | None:
        """The team member whose own user in `sandbox_id` is `user`, if any."""

        def find(session: Session) -> str | None:
            row = session.exec(select(Member).where(Member.sandbox_id == sandbox_id, Member.unix_user == user)).first()
            return row.id if row is not None else None

        return await self._store.run(find)

    async def owner_of_runtime(self, runtime_id: str) -> Identity | None:
        """What a bridge in this runtime acts as: the token of the live sandbox on it, if any."""

        def find(session: Session) -> str | None:
            runtime = session.get(Runtime, runtime_id)
            sandbox = session.get(Sandbox, runtime.sandbox_id) if runtime and runtime.sandbox_id else None
            if sandbox is None or sandbox.status != SandboxStatus.RUNNING or sandbox.runtime_id != runtime_id:
                return None
            return sandbox.id

        sandbox_id = await self._store.run(find)
        return await self._tokens.sandbox_identity(sandbox_id) if sandbox_id else None
