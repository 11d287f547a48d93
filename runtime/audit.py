"""The audit log: one hash-chained row per action, written whether the action worked or not."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
from sqlmodel import Session, col, select

from dockyard.runtime.errors import DockyardError
from dockyard.runtime.settings import Identity
from dockyard.runtime.store import AuditEvent, Store, utcnow

__all__ = ["AuditLog", "AuditRecord", "GENESIS"]

GENESIS = "0" * 64


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
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@dataclass
class AuditRecord:
    """An action in progress; fill `detail` and `target` as they become known."""

    kind: str
    target: str | None
    detail: dict[str, Any] = field(default_factory=dict)


class AuditLog:
    """Appends audit rows through the store."""

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
        """Write one row, chained to the last one."""

        def append(session: Session) -> AuditEvent:
            last = session.exec(select(AuditEvent.hash).order_by(col(AuditEvent.id).desc()).limit(1)).first()
            row = AuditEvent(
                ts=utcnow(),
                workspace_id=who.workspace_id,
                project_id=who.project_id,
                user_id=who.user_id,
                run_id=who.run_id,
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
        """Time the block and write its row: outcome `ok`, or `error` with the error's message."""
        rec = AuditRecord(kind, target, dict(detail))
        started = time.perf_counter()
        try:
            yield rec
        except BaseException as exc:
            rec.detail["error"] = str(exc) if isinstance(exc, DockyardError) else type(exc).__name__
            outcome = "cancelled" if _is_cancel(exc) else "error"
            await self.append(
                who, kind, target=rec.target, outcome=outcome, detail=rec.detail, duration_ms=_ms(started)
            )
            raise
        await self.append(who, kind, target=rec.target, outcome="ok", detail=rec.detail, duration_ms=_ms(started))

    async def query(self, workspace_id: str | None = None, kind: str | None = None, limit: int = 1000) -> list[AuditEvent]:
        def query(session: Session) -> list[AuditEvent]:
            stmt = select(AuditEvent).order_by(col(AuditEvent.id))
            if workspace_id is not None:
                stmt = stmt.where(AuditEvent.workspace_id == workspace_id)
            if kind is not None:
                stmt = stmt.where(AuditEvent.kind == kind)
            return list(session.exec(stmt.limit(limit)).all())

        return await self._store.run(query)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _is_cancel(exc: BaseException) -> bool:
    return isinstance(exc, anyio.get_cancelled_exc_class())
