"""Scoped bearer tokens: minting (only ever narrower), verifying, revoking, and the checks
every tool makes with them.

A token is `dyt_` and 43 random URL-safe characters; the store keeps only its SHA-256. Each
token carries scopes and an attribution (workspace, project, user, run, and for a sandbox's
own token the sandbox). A holder of `token:mint` may mint tokens with a subset of its scopes,
the same or a narrower attribution and an expiry no later than its own. The admin key (server
side only) is the root: every scope, any workspace.

Bindings are facts the server assigns: a token's run and sandbox are set only when dockyard
creates that run or sandbox (`mint_for_run`, `mint_for_sandbox`); `mint` can only pass on the
issuer's own. Every token records the token it came from, and revoking one revokes all that
came from it, in the same transaction; a token whose issuer is no longer live cannot be
minted. Every call re-checks that its token is live (`require`), so a session opened with a
token that was revoked since is refused on its next call.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from dockyard.runtime.substrate.actions import Action, Scope
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.errors import AccessDeniedError, InvalidRequestError, NotFoundError, ScopeError
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import Store, Token, utcnow

__all__ = ["ADMIN", "SANDBOX_SCOPES", "SCOPES", "Minted", "TokenService", "holds"]

SCOPES = tuple(Scope)
# What a sandbox's own token (its bridge) may do: work inside that sandbox, nothing more.
SANDBOX_SCOPES = [Scope.SANDBOX_EXEC, Scope.SANDBOX_FILES]
ANY = "*"
ADMIN = Identity(workspace_id=ANY, project_id=ANY, user_id="admin", scopes=[ANY])
_ADMIN_ACTS = (Scope.TOKEN_MINT, Scope.AUDIT_READ)
_DEFAULTS = {"workspace_id": "", "project_id": "default", "user_id": "user"}
_PREFIX = "dyt_"
_DEFAULT_TTL = timedelta(hours=24)
_MAX_TTL = timedelta(days=365)


def holds(who: Identity, scope: str) -> bool:
    """Whether `who` may act with `scope`, as `TokenService.require` decides it (without the
    liveness check or the audit): the admin key only mints tokens and reads the audit."""
    return (who.workspace_id != ANY or scope in _ADMIN_ACTS) and who.allows(scope)


def _hash(token: str) -> str:
    # surrogatepass: a presented string may hold anything (a lone surrogate from the bridge's JSON)
    return hashlib.sha256(token.encode(errors="surrogatepass")).hexdigest()


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite hands datetimes back without a zone; they were stored as UTC."""
    if moment is not None and moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment


@dataclass(frozen=True)
class Minted:
    """A new token: the secret (shown once) and what it may do."""

    token: str
    token_id: str
    identity: Identity
    expires_at: datetime | None


class TokenService:
    """Mints, verifies and revokes tokens; `require` is the check every tool makes."""

    def __init__(self, store: Store, audit: AuditLog, admin_key: str | None) -> None:
        self._store = store
        self._audit = audit
        self._admin_key = admin_key
        self._expiry: dict[str, datetime | None] = {}
        # Told the ids of tokens just revoked (the server ends what still listens with them).
        self.on_revoke: Callable[[set[str]], None] | None = None

    def set_admin_key(self, key: str) -> None:
        self._admin_key = key

    # -- checks ---------------------------------------------------------------------

    async def require(
        self,
        who: Identity,
        scope: Scope,
        action: Action,
        target: str | None = None,
    ) -> Identity:
        """`who`, if it holds `scope`; otherwise a denied row in the audit log and a ScopeError."""
        if who.workspace_id == ANY and scope not in _ADMIN_ACTS:
            raise await self.deny(
                who,
                action,
                "the admin key only mints tokens and reads the audit; mint a token for a workspace to work in it",
                target,
            )
        await self.live(who, action, target)
        if who.allows(scope):
            return who
        await self._audit.append(
            who, action, target=target, outcome="denied", detail={"missing_scope": scope, "token_id": who.token_id}
        )
        raise ScopeError(scope, who.scopes)

    async def live(
        self,
        who: Identity,
        action: Action,
        target: str | None = None,
    ) -> Identity:
        """`who`, if the token it acts with is still live (not revoked, not expired); else an
        audited refusal. Identities without a token (the operator, dockyard's own) are live."""
        if who.token_id is None:
            return who
        row = await self._store.get(Token, who.token_id)
        problem = _dead(row, who.token_id)
        if problem is not None:
            raise await self.deny(who, action, problem, target)
        return who

    async def may_end(
        self,
        who: Identity,
        owner_user_id: str,
        action: Action,
        target: str,
        what: str,
    ) -> None:
        """Refuse (audited) ending what another user of the workspace made, unless the caller
        holds workspace:admin. Reading and working in it stay shared within the workspace."""
        if owner_user_id == who.user_id or who.allows(Scope.WORKSPACE_ADMIN):
            return
        raise await self.deny(
            who,
            action,
            f"this {what} belongs to user '{owner_user_id}'; ending another user's {what} needs the workspace:admin scope",
            target,
        )

    async def deny(
        self,
        who: Identity,
        action: Action,
        message: str,
        target: str | None = None,
    ) -> AccessDeniedError:
        """Audit a refusal and return the error to raise."""
        await self._audit.append(
            who, action, target=target, outcome="denied", detail={"error": message, "token_id": who.token_id}
        )
        return AccessDeniedError(message)

    # -- verify ---------------------------------------------------------------------

    async def verify(self, token: str) -> Identity:
        """The identity a presented token acts as; raises AccessDeniedError for anything else."""
        if self._admin_key and hmac.compare_digest(token.encode(errors="surrogatepass"), self._admin_key.encode()):
            return ADMIN
        if not token.startswith(_PREFIX):
            raise AccessDeniedError("this is not a token minted by this dockyard server")
        row = await self._store.run(lambda s: s.exec(select(Token).where(Token.secret_hash == _hash(token))).first())
        if row is None:
            raise AccessDeniedError("unknown token; it was not minted by this dockyard server")
        problem = _dead(row, row.id)
        if problem is not None:
            raise AccessDeniedError(problem)
        self._expiry[row.id] = _aware(row.expires_at)
        return _identity(row)

    def expiry(self, token_id: str | None) -> datetime | None:
        """When a verified token expires (None: never, or not a token)."""
        return self._expiry.get(token_id or "")

    # -- mint -----------------------------------------------------------------------

    async def mint(
        self,
        issuer: Identity,
        *,
        scopes: list[str],
        workspace_id: str | None = None,
        project_id: str | None = None,
        user_id: str | None = None,
        run_id: str | None = None,
        ttl_s: int | None = None,
        label: str | None = None,
    ) -> Minted:
        """A token no wider than `issuer`: its scopes, attribution and expiry at most the issuer's."""
        await self.require(issuer, Scope.TOKEN_MINT, Action.TOKEN_MINT)
        if not scopes:
            raise InvalidRequestError(f"give at least one scope; known scopes: {', '.join(SCOPES)}")
        unknown = [scope for scope in scopes if scope not in SCOPES and scope != ANY]
        if unknown:
            raise InvalidRequestError(f"unknown scope {', '.join(unknown)}; known scopes: {', '.join(SCOPES)}")
        wider = [scope for scope in scopes if not issuer.allows(scope) or (scope == ANY and ANY not in issuer.scopes)]
        if wider:
            raise await self.deny(
                issuer, Action.TOKEN_MINT, f"a token can only mint narrower tokens; yours lacks {', '.join(wider)}"
            )
        chain: dict[str, str] = {}
        asks = {"workspace_id": workspace_id, "project_id": project_id, "user_id": user_id}
        if issuer.workspace_id == ANY:  # the admin: any attribution, but it must name the workspace
            if workspace_id in (None, ANY) or ANY in (project_id, user_id):
                raise InvalidRequestError("say which workspace the token is for (and no '*' in its attribution)")
            asks = {field: asked or _DEFAULTS[field] for field, asked in asks.items()}
        for field, asked in asks.items():
            own = getattr(issuer, field)
            if issuer.workspace_id == ANY:
                chain[field] = str(asked)
            elif asked not in (None, own):
                raise await self.deny(
                    issuer,
                    Action.TOKEN_MINT,
                    f"a token can only mint narrower tokens; {field} must stay '{own}', not '{asked}'",
                )
            else:
                chain[field] = own
        if run_id not in (None, issuer.run_id):
            held = f"must stay '{issuer.run_id}'" if issuer.run_id else "cannot be named: your token is bound to no run"
            raise await self.deny(
                issuer,
                Action.TOKEN_MINT,
                f"run_id {held}; runs are bound by dockyard when it starts them (a dispatch's or member's own token)",
            )
        now = utcnow()
        ttl = timedelta(seconds=ttl_s) if ttl_s is not None else _DEFAULT_TTL
        if ttl <= timedelta(0) or ttl > _MAX_TTL:
            raise InvalidRequestError(f"ttl_s must be between 1 and {int(_MAX_TTL.total_seconds())}")
        expires = now + ttl
        ceiling = self.expiry(issuer.token_id)
        if ceiling is not None and expires > ceiling:
            if ttl_s is not None:
                raise await self.deny(
                    issuer,
                    Action.TOKEN_MINT,
                    f"a token cannot outlive its issuer, which expires at {ceiling.isoformat()}",
                )
            expires = ceiling
        minted = await self._insert(
            scopes=sorted(set(scopes)),
            run_id=issuer.run_id,
            sandbox_id=issuer.sandbox_id,
            parent_id=issuer.token_id,
            expires_at=expires,
            label=label,
            **chain,
        )
        await self._audit.append(
            issuer,
            Action.TOKEN_MINT,
            target=minted.token_id,
            outcome="ok",
            detail={
                "scopes": minted.identity.scopes,
                "for": chain,
                "expires_at": expires.isoformat(),
                "token_id": issuer.token_id,
            },
        )
        return minted

    async def mint_for_sandbox(self, owner: Identity, sandbox_id: str, expires_at: datetime | None) -> Minted:
        """The sandbox's own token: its owner's attribution, work inside that sandbox only."""
        return await self._insert(
            scopes=list(SANDBOX_SCOPES),
            workspace_id=owner.workspace_id,
            project_id=owner.project_id,
            user_id=owner.user_id,
            run_id=owner.run_id,
            sandbox_id=sandbox_id,
            parent_id=owner.token_id,
            expires_at=expires_at,
            label=f"sandbox {sandbox_id}",
        )

    async def mint_for_run(
        self,
        owner: Identity,
        run_id: str,
        scopes: Sequence[Scope],
        expires_at: datetime,
        sandbox_id: str | None,
        parent_id: str | None = None,
    ) -> Minted:
        """A runner's token: its caller's attribution, narrowed to one run, to `scopes` (never
        wider than the caller's) and to the sandbox it works in. `parent_id` is the token that
        started the run (revoking it revokes this one); by default the owner's."""
        granted = [scope for scope in scopes if owner.allows(scope)]
        return await self._insert(
            scopes=granted,
            workspace_id=owner.workspace_id,
            project_id=owner.project_id,
            user_id=owner.user_id,
            run_id=run_id,
            sandbox_id=sandbox_id,
            parent_id=parent_id or owner.token_id,
            expires_at=expires_at,
            label=f"run {run_id}",
        )

    async def revoke_run(self, run_id: str, reason: str) -> None:
        """Revoke every token of a run that ended, and every token minted from them."""

        def revoke(session: Session) -> set[str]:
            stmt = select(Token.id).where(Token.run_id == run_id, Token.label == f"run {run_id}")
            return _revoke_tree(session, set(session.exec(stmt).all()), reason)

        self._revoked(await self._store.run(revoke))

    async def sandbox_identity(self, sandbox_id: str) -> Identity | None:
        """What a sandbox's bridge acts as: its own live token, if it has one (never a run's
        token bound to it: a runner presents that itself)."""

        def find(session: Session) -> Token | None:
            stmt = select(Token).where(
                Token.sandbox_id == sandbox_id, Token.label == f"sandbox {sandbox_id}", col(Token.revoked_at).is_(None)
            )
            return session.exec(stmt.order_by(col(Token.created_at).desc())).first()

        row = await self._store.run(find)
        return _identity(row) if row is not None else None

    async def _insert(self, **fields: Any) -> Minted:
        """Store a new token, unless the token it comes from is no longer live (checked in the
        same transaction, so a revocation racing the mint cannot leave a live child)."""
        token = _PREFIX + secrets.token_urlsafe(32)
        row = Token(id=f"tok_{secrets.token_hex(8)}", secret_hash=_hash(token), **fields)

        def insert(session: Session) -> str | None:
            if row.parent_id is not None:
                problem = _dead(session.get(Token, row.parent_id), row.parent_id)
                if problem is not None:
                    return problem
            session.add(row)
            return None

        problem = await self._store.run(insert)
        if problem is not None:
            raise AccessDeniedError(f"no token can be minted from a token that is not live: {problem}")
        self._expiry[row.id] = _aware(row.expires_at)
        return Minted(token=token, token_id=row.id, identity=_identity(row), expires_at=_aware(row.expires_at))

    # -- revoke ---------------------------------------------------------------------

    async def revoke(self, who: Identity, token_id: str, reason: str = "revoked by its owner") -> Token:
        """Revoke a token within the caller's reach, and every token minted from it: the
        caller's own user's tokens and those minted from the caller's token; another user's
        needs workspace:admin (the admin key reaches every workspace)."""
        await self.require(who, Scope.TOKEN_MINT, Action.TOKEN_REVOKE, token_id)

        def revoke(session: Session) -> tuple[Token, set[str]] | str | None:
            row = session.get(Token, token_id)
            if row is None or (who.workspace_id != ANY and row.workspace_id != who.workspace_id):
                return None
            if who.workspace_id != ANY and row.user_id != who.user_id and not who.allows(Scope.WORKSPACE_ADMIN):
                if who.token_id is None or who.token_id not in _lineage(session, row):
                    return f"token {row.id} belongs to user '{row.user_id}'; revoking another user's token needs the workspace:admin scope"
            return row, _revoke_tree(session, {row.id}, reason)

        done = await self._store.run(revoke)
        if done is None:
            raise NotFoundError(f"unknown token '{token_id}'; token ids look like tok_... and are shown when minted")
        if isinstance(done, str):
            raise await self.deny(who, Action.TOKEN_REVOKE, done, token_id)
        row, revoked = done
        self._revoked(revoked)
        await self._audit.append(
            who,
            Action.TOKEN_REVOKE,
            target=token_id,
            outcome="ok",
            detail={"reason": reason, "token_id": who.token_id, "also_revoked": sorted(revoked - {token_id})},
        )
        return row

    def _revoked(self, token_ids: set[str]) -> None:
        for token_id in token_ids:
            self._expiry.pop(token_id, None)
        if token_ids and self.on_revoke is not None:
            self.on_revoke(token_ids)

    async def revoke_sandbox(self, sandbox_id: str, reason: str) -> None:
        """Revoke every token of a sandbox that ended."""

        def revoke(session: Session) -> set[str]:
            return _revoke_tree(
                session, set(session.exec(select(Token.id).where(Token.sandbox_id == sandbox_id)).all()), reason
            )

        self._revoked(await self._store.run(revoke))


def _dead(row: Token | None, token_id: str) -> str | None:
    """Why a token is not live (unknown, revoked, expired), or None when it is."""
    if row is None:
        return f"token {token_id} is unknown to this server"
    if row.revoked_at is not None:
        return f"token {row.id} was revoked ({row.revoked_reason or 'no reason given'})"
    expires = _aware(row.expires_at)
    if expires is not None and expires <= utcnow():
        return f"token {row.id} expired at {expires.isoformat()}"
    return None


def _lineage(session: Session, row: Token) -> set[str]:
    """The ids of the tokens `row` was minted from, up to its root."""
    seen: set[str] = set()
    parent = row.parent_id
    while parent is not None and parent not in seen:
        seen.add(parent)
        above = session.get(Token, parent)
        parent = above.parent_id if above is not None else None
    return seen


def _revoke_tree(session: Session, roots: set[str], reason: str) -> set[str]:
    """Revoke `roots` and, transitively, every token minted from them; returns the ids that
    were live and are revoked now. One transaction: no child outlives its parent's revocation."""
    now, revoked, frontier, seen = utcnow(), set(), set(roots), set(roots)
    while frontier:
        rows = session.exec(select(Token).where(col(Token.id).in_(frontier))).all()
        for row in rows:
            if row.revoked_at is None:
                row.revoked_at, row.revoked_reason = (
                    now,
                    reason if row.id in roots else f"{reason} (it came from a revoked token)",
                )
                session.add(row)
                revoked.add(row.id)
        children = set(session.exec(select(Token.id).where(col(Token.parent_id).in_(frontier))).all())
        frontier = children - seen
        seen |= frontier
    return revoked


def _identity(row: Token) -> Identity:
    return Identity(
        workspace_id=row.workspace_id,
        project_id=row.project_id,
        user_id=row.user_id,
        run_id=row.run_id,
        scopes=list(row.scopes),
        token_id=row.id,
        sandbox_id=row.sandbox_id,
    )
