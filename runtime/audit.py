"""The audit log: one hash-chained row per action, written whether the action worked or not.

Each row's `hash` is the SHA-256 of its content and its predecessor's hash (`prev_hash`; the
first row links to GENESIS), so editing a row breaks its own hash and deleting one breaks its
successor's link. `verify` walks the chain and names the first row that does not hold. A
chain alone cannot show that its newest rows were cut off: keep a recent row's hash elsewhere
if that matters.

An action whose row cannot be written fails (fail closed): nothing is reported as done that
the log does not show.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
from sqlmodel import Session, col, select

from dockyard.runtime.errors import AuditWriteError, DockyardError
from dockyard.runtime.models import AuditEntry, AuditVerification
from dockyard.runtime.settings import Identity
from dockyard.runtime.store import AuditEvent, Store, utcnow

__all__ = ["AuditLog", "AuditRecord", "GENESIS", "audit_entry"]

log = logging.getLogger(__name__)

GENESIS = "0" * 64
_VERIFY_BATCH = 1000


def _row_hash(row: AuditEvent) -> str:
    body = {
        "ts": row.ts.isoformat(),
        "workspace_id": row.workspace_id,
        "project_id": row.project_id,
        "user_id": row.user_id,
        "run_id": row.run_id,
        "kind": row.kind,
        "target": row.target,
        "outcome": row.outcome,
        "detail": row.detail,
        "duration_ms": row.duration_ms,
        "prev_hash": row.prev_hash,
    }
    # Part of the body only when set, so rows written before tokens existed keep their hashes;
    # setting or clearing it on any row still changes that row's hash.
    if row.token_id is not None:
        body["token_id"] = row.token_id
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class AuditRecord:
    """An action in progress; fill `detail` and `target` as they become known."""

    kind: str
    target: str | None
    detail: dict[str, Any] = field(default_factory=dict)


class AuditLog:
    """Appends audit rows through the store, queries them and verifies their chain."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def append(
        self,
        who: Identity,
        kind: str,
        *,
        target: str | None,
        outcome: str,
        detail: dict[str, Any],
        duration_ms: float = 0.0,
    ) -> AuditEvent:
        """Write one row, chained to the last one; attributed to `who` and the token it presented."""

        def append(session: Session) -> AuditEvent:
            last = session.exec(select(AuditEvent.hash).order_by(col(AuditEvent.id).desc()).limit(1)).first()
            row = AuditEvent(
                ts=utcnow(),
                workspace_id=who.workspace_id,
                project_id=who.project_id,
                user_id=who.user_id,
                run_id=who.run_id,
                token_id=who.token_id,
                kind=kind,
                target=target,
                outcome=outcome,
                detail=json.dumps(detail, sort_keys=True, default=str),
                duration_ms=round(duration_ms, 3),
                prev_hash=last or GENESIS,
                hash="",
            )
            row.hash = _row_hash(row)
            session.add(row)
            return row

        return await self._store.run(append)

    @asynccontextmanager
    async def record(self, who: Identity, kind: str, target: str | None = None, **detail: Any) -> AsyncIterator[AuditRecord]:
        """Time the block and write its row: outcome `ok`, or `error` with the error's message.

        If the row cannot be written, the action fails with an AuditWriteError (a cancellation
        still propagates as one; the server log then has the row that was lost).
        """
        rec = AuditRecord(kind, target, dict(detail))
        started = time.perf_counter()
        try:
            yield rec
        except BaseException as exc:
            rec.detail["error"] = str(exc) if isinstance(exc, DockyardError) else type(exc).__name__
            outcome = "cancelled" if _is_cancel(exc) else "error"
            await self._write(who, rec, outcome, started, failure=exc)
            raise
        await self._write(who, rec, "ok", started)

    async def _write(
        self, who: Identity, rec: AuditRecord, outcome: str, started: float, failure: BaseException | None = None
    ) -> None:
        try:
            await self.append(who, rec.kind, target=rec.target, outcome=outcome, detail=rec.detail, duration_ms=_ms(started))
        except Exception as exc:
            log.error("audit row lost: %s %s by %s/%s ended %s: %s", rec.kind, rec.target, who.workspace_id,
                      who.user_id, outcome, json.dumps(rec.detail, default=str), exc_info=True)
            if failure is not None and not isinstance(failure, Exception):
                return  # a cancellation (or shutdown) goes on as it is
            raise AuditWriteError(rec.kind, _reason(exc), None if failure is None else rec.detail["error"]) from exc

    async def query(
        self,
        workspace_id: str | None = None,
        actor: str | None = None,
        kind: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
    ) -> list[AuditEvent]:
        """Rows matching every filter given, newest first (highest id first), at most `limit`.

        `actor` is a user id; `since` is inclusive and `until` exclusive; a time without a zone
        is taken as UTC.
        """

        def query(session: Session) -> list[AuditEvent]:
            stmt = select(AuditEvent).order_by(col(AuditEvent.id).desc())
            if workspace_id is not None:
                stmt = stmt.where(AuditEvent.workspace_id == workspace_id)
            if actor is not None:
                stmt = stmt.where(AuditEvent.user_id == actor)
            if kind is not None:
                stmt = stmt.where(AuditEvent.kind == kind)
            if since is not None:
                stmt = stmt.where(col(AuditEvent.ts) >= _utc(since))
            if until is not None:
                stmt = stmt.where(col(AuditEvent.ts) < _utc(until))
            return list(session.exec(stmt.limit(limit)).all())

        return await self._store.run(query)

    async def verify(self, batch: int = _VERIFY_BATCH) -> AuditVerification:
        """Walk the whole chain in id order, `batch` rows at a time, and report the first broken row.

        A row is broken when its `prev_hash` is not its predecessor's hash (a row before it was
        deleted or rewritten) or its `hash` is not the hash of its content (it was edited).
        """
        expected, after, checked = GENESIS, 0, 0
        previous: int | None = None
        while True:

            def page(session: Session, after: int = after) -> list[AuditEvent]:
                stmt = select(AuditEvent).where(col(AuditEvent.id) > after).order_by(col(AuditEvent.id)).limit(batch)
                return list(session.exec(stmt).all())

            rows = await self._store.run(page)
            for row in rows:
                checked += 1
                assert row.id is not None
                if row.prev_hash != expected:
                    before = "the chain's start" if previous is None else f"row {previous}'s hash"
                    return _broken(checked, row.id, f"its prev_hash does not match {before}; a row before it was "
                                   "deleted or rewritten")
                if row.hash != _row_hash(row):
                    return _broken(checked, row.id, "its content does not match its hash; the row was edited")
                expected, previous = row.hash, row.id
            if len(rows) < batch:
                return AuditVerification(rows_checked=checked, intact=True)
            after = rows[-1].id or after


def audit_entry(row: AuditEvent) -> AuditEntry:
    """A row as a caller sees it, with its detail parsed."""
    try:
        detail = json.loads(row.detail)
    except ValueError:
        detail = None
    assert row.id is not None
    return AuditEntry(
        id=row.id,
        ts=row.ts,
        workspace_id=row.workspace_id,
        project_id=row.project_id,
        user_id=row.user_id,
        run_id=row.run_id,
        token_id=row.token_id,
        kind=row.kind,
        target=row.target,
        outcome=row.outcome,
        detail=detail if isinstance(detail, dict) else {"unparsed": row.detail},
        duration_ms=row.duration_ms,
    )


def _broken(checked: int, row_id: int, reason: str) -> AuditVerification:
    return AuditVerification(rows_checked=checked, intact=False, first_broken_id=row_id, reason=reason)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _reason(exc: Exception) -> str:
    """A failed write in a few words: the database's own message, never the statement or its values."""
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error
    return str(orig) if orig is not None and str(orig) else type(exc).__name__


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _is_cancel(exc: BaseException) -> bool:
    return isinstance(exc, anyio.get_cancelled_exc_class())
