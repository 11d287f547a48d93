"""Computers: a real headless Chromium per agent, in its own container, driven with Playwright.

A computer is a runtime of a `computer` template claimed from the pool, so a claim hands over a
browser that is already running. The container has no network at all: the server reaches the
browser over the Chrome DevTools Protocol through a unix socket in a host directory (relayed to
a loopback port for Playwright, behind a bearer token only this server knows), and every request
the page makes is intercepted. A request to a preview that one of the same workspace's sandboxes
exposes (`sandbox_expose_port`) is fetched by the server with that preview's key and handed to
the page; anything else is refused. So a computer cannot reach another workspace's runtimes,
this machine's services (dockyard's own port included) or a cloud metadata address, and
`file://` and other schemes are refused before the browser sees them.

A computer is never reused: when it is destroyed, its container goes, and the pool starts a
fresh one, so no cookie, storage or history outlives its owner. Each computer is its own
browser; parallel agents never share one.

This module holds a computer's lifecycle (claim, list, ownership, expiry, end); the
connections to the browsers and their request filter are in `browsers.py`, the actions on a
page in `pages.py`.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from datetime import timedelta

import anyio
from sqlmodel import Session, col, select

from dockyard.runtime.runtimes.browsers import PlaywrightBrowsers
from dockyard.runtime.runtimes.images import BuildState
from dockyard.runtime.runtimes.pool import PoolManager
from dockyard.runtime.runtimes.quotas import computer_quota
from dockyard.runtime.substrate.actions import Action
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.errors import ComputerNotFoundError, InvalidRequestError
from dockyard.runtime.substrate.models import ComputerInfo
from dockyard.runtime.substrate.settings import Identity, Settings
from dockyard.runtime.substrate.store import Computer, Runtime, RuntimeState, SandboxStatus, Store, utcnow
from dockyard.runtime.substrate.tokens import TokenService

__all__ = ["ComputerService"]


class ComputerService:
    """Claims, lists, checks and ends computers; their pages are driven by `PageService`."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        audit: AuditLog,
        pools: PoolManager,
        browsers: PlaywrightBrowsers,
        tokens: TokenService,
    ) -> None:
        self._settings = settings
        self._tokens = tokens
        self._limits = settings.computers
        self._store = store
        self._audit = audit
        self._pools = pools
        self._browsers = browsers

    # -- create and destroy ---------------------------------------------------------------

    async def create(
        self,
        who: Identity,
        *,
        template: str | None = None,
        width: int | None = None,
        height: int | None = None,
        ttl_s: int | None = None,
        notify: Callable[[BuildState], Awaitable[None]] | None = None,
    ) -> ComputerInfo:
        """Claim a running browser from the pool and open a blank page in it (`notify` hears
        an image build the claim waits for)."""
        name = template or self._limits.default_template
        async with self._audit.record(who, Action.COMPUTER_CREATE, template=name) as rec:
            tpl = self._settings.templates.get(name)
            if tpl is None or tpl.kind != "computer":
                known = [n for n, t in self._settings.templates.items() if t.kind == "computer"]
                raise InvalidRequestError(
                    f"unknown computer template '{name}'; computer templates: {', '.join(known) or 'none'}"
                )
            width, height = width or self._limits.width, height or self._limits.height
            ttl = ttl_s or self._limits.default_ttl_s
            if not 60 <= ttl <= self._limits.max_ttl_s:
                raise InvalidRequestError(f"ttl_s must be between 60 and {self._limits.max_ttl_s}")
            computer_id = f"cmp_{secrets.token_hex(8)}"
            rec.target = computer_id
            within_quotas = computer_quota(self._settings.quotas, who)
            await self._store.run(within_quotas)  # early, so a refused call claims nothing

            def bind(session: Session, runtime: Runtime) -> None:
                within_quotas(session)  # again, in the claim's own transaction
                runtime.sandbox_id = computer_id  # the claim's id: a computer's here
                session.add(
                    Computer(
                        id=computer_id,
                        runtime_id=runtime.id,
                        container_id=runtime.container_id or "",
                        template=name,
                        width=width,
                        height=height,
                        workspace_id=who.workspace_id,
                        project_id=who.project_id,
                        user_id=who.user_id,
                        run_id=who.run_id,
                        token_id=who.token_id,
                        expires_at=utcnow() + timedelta(seconds=ttl),
                    )
                )

            lease = await self._pools.claim(name, who.workspace_id, bind, network=tpl.network, notify=notify)
            row = await self._store.get(Computer, computer_id)
            assert row is not None
            try:
                await self._browsers.connect(row)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._end(row, "its browser could not be reached")
                raise
            rec.detail.update(
                runtime=lease.runtime.id, served="warm" if lease.warm else "cold", claim_ms=round(lease.claim_ms, 2)
            )
        return _info(row)

    async def destroy(self, who: Identity, computer_id: str) -> None:
        """End the computer: its container is removed, never handed to anyone else."""
        row = await self.owned(who, computer_id, Action.COMPUTER_DESTROY)
        await self._tokens.may_end(who, row.user_id, Action.COMPUTER_DESTROY, computer_id, "computer")
        async with self._audit.record(who, Action.COMPUTER_DESTROY, computer_id):
            await self._end(row, "destroyed by its owner")

    async def list(self, who: Identity) -> list[ComputerInfo]:
        rows = await self._store.run(
            lambda s: list(
                s.exec(
                    select(Computer)
                    .where(Computer.workspace_id == who.workspace_id, Computer.status == SandboxStatus.RUNNING)
                    .order_by(col(Computer.created_at))
                ).all()
            )
        )
        return [_info(row) for row in rows]

    async def reap_expired(self) -> int:
        """End computers past their expiry; returns how many."""
        rows = await self._store.run(
            lambda s: list(
                s.exec(
                    select(Computer).where(
                        Computer.status == SandboxStatus.RUNNING, col(Computer.expires_at) <= utcnow()
                    )
                ).all()
            )
        )
        for row in rows:
            owner = Identity(
                workspace_id=row.workspace_id, project_id=row.project_id, user_id=row.user_id, run_id=row.run_id
            )
            async with self._audit.record(owner, Action.COMPUTER_EXPIRE, row.id):
                await self._end(row, "its ttl expired")
        return len(rows)

    # -- ownership --------------------------------------------------------------------------

    async def owned(self, who: Identity, computer_id: str, action: Action) -> Computer:
        """The caller's live computer; another workspace's is unknown to them (and audited)."""
        row = await self._store.get(Computer, computer_id)
        if row is None or row.workspace_id != who.workspace_id or who.sandbox_id is not None:
            await self._audit.append(
                who,
                action,
                target=computer_id,
                outcome="denied",
                detail={"error": "no such computer in the caller's reach", "token_id": who.token_id},
            )
            raise ComputerNotFoundError(computer_id)
        if row.status != SandboxStatus.RUNNING:
            raise ComputerNotFoundError(computer_id, f"computer '{computer_id}' is {row.status}: {row.end_reason}")
        runtime = await self._store.get(Runtime, row.runtime_id)
        if runtime is None or runtime.state != RuntimeState.CLAIMED or runtime.sandbox_id != row.id:
            await self._mark_lost(row)
            raise ComputerNotFoundError(
                computer_id, f"computer '{computer_id}' was lost: its container is gone; create another"
            )
        return row

    async def _mark_lost(self, row: Computer) -> None:
        await self._browsers.disconnect(row.id)

        def lose(session: Session) -> None:
            fresh = session.get(Computer, row.id)
            if fresh is not None and fresh.status == SandboxStatus.RUNNING:
                fresh.status, fresh.ended_at, fresh.end_reason = SandboxStatus.LOST, utcnow(), "its container is gone"
                session.add(fresh)

        await self._store.run(lose)

    async def _end(self, row: Computer, reason: str) -> None:
        await self._browsers.disconnect(row.id)

        def close(session: Session, _runtime: Runtime | None) -> None:
            fresh = session.get(Computer, row.id)
            if fresh is not None and fresh.status == SandboxStatus.RUNNING:
                fresh.status, fresh.ended_at, fresh.end_reason = SandboxStatus.DESTROYED, utcnow(), reason
                session.add(fresh)

        await self._pools.release(row.runtime_id, close, reason)
        await self._store.run(lambda s: close(s, None))  # if the runtime was already gone
        self._browsers.forget(row.id)


def _info(row: Computer) -> ComputerInfo:
    return ComputerInfo(
        computer_id=row.id,
        template=row.template,
        width=row.width,
        height=row.height,
        created_at=row.created_at,
        expires_at=row.expires_at,
    )
