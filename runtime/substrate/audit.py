"""The audit log: one hash-chained, keyed row per action, written whether the action worked or not.

Each row's `hash` is the SHA-256 of its content and its predecessor's hash (`prev_hash`; the
first row links to GENESIS), so editing a row breaks its own hash and deleting one breaks its
successor's link. Each row's `mac` binds its id and hash under a key the database does not
hold, and a signed head outside the table names the row count and the last hash (see
`auditanchor`), so a chain recomputed without the key, rows cut from the tail and an emptied
table all show. `verify` (in `auditverify`) walks the chain and names what does not hold.

Actions that may outlive the server (a command, a snapshot, a dispatch run, a team turn) write a
`started` row before they begin and a second row, linked by `started_id`, when they end; at the
next start `recover` appends an `interrupted` row for each one that never ended. Rows are never
edited.

An action whose row cannot be written fails (fail closed): nothing is reported as done that
the log does not show.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from sqlalchemy import func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from dockyard.runtime.substrate.actions import Action
from dockyard.runtime.substrate.auditanchor import GENESIS, AuditAnchor, Head, HeadProblem, row_hash
from dockyard.runtime.substrate.auditverify import Export, verify_chain
from dockyard.runtime.substrate.errors import AuditWriteError, DockyardError
from dockyard.runtime.substrate.models import AuditEntry, AuditVerification
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import AuditEvent, Store, utcnow

__all__ = ["GENESIS", "AuditLog", "AuditRecord", "audit_entry", "row_hash"]

log = logging.getLogger(__name__)

_INTERRUPTED = "the server stopped before the action ended; it may or may not have taken effect"
_VERIFY_BATCH = 1000


@dataclass
class AuditRecord:
    """An action in progress; fill `detail` and `target` as they become known."""

    kind: Action
    target: str | None
    detail: dict[str, Any] = field(default_factory=dict)


def _newest(session: Session) -> tuple[int, str] | None:
    """The id and hash of the newest row, or None while the table is empty."""
    row = session.exec(select(AuditEvent.id, AuditEvent.hash).order_by(col(AuditEvent.id).desc()).limit(1)).first()
    if row is None:
        return None
    newest, digest = row
    assert newest is not None  # a stored row has its id
    return newest, digest


class AuditLog:
    """Appends audit rows through the store, queries them and verifies their chain.

    `data_dir` holds the anchors: the key (made on the first append) and the signed head.
    """

    def __init__(self, store: Store, data_dir: Path) -> None:
        self._store = store
        self.anchor = AuditAnchor(data_dir)
        self._lock = anyio.Lock()
        self._warned = False

    async def append(
        self,
        who: Identity,
        kind: Action,
        *,
        target: str | None,
        outcome: str,
        detail: dict[str, Any],
        duration_ms: float = 0.0,
    ) -> AuditEvent:
        """Write one row, chained to the last one and keyed; attributed to `who` and the token it
        presented. The head is moved on to it once it is committed."""
        return await self._append(
            who, str(kind), target=target, outcome=outcome, detail=detail, duration_ms=duration_ms
        )

    async def _append(
        self,
        who: Identity,
        kind: str,
        *,
        target: str | None,
        outcome: str,
        detail: dict[str, Any],
        duration_ms: float = 0.0,
    ) -> AuditEvent:
        """`append`, for any `kind`: `recover` writes the kind a stored row already has."""
        # Filled in the store's thread: the lock must be released even if the commit fails after
        # `append` returned, and the head is written only once the commit succeeded.
        locked: list[int] = []
        advance: list[tuple[bytes, Head]] = []

        def append(session: Session) -> AuditEvent:
            locked.append(self.anchor.lock())
            key, head = self._anchored(session)
            last = _newest(session)
            row = AuditEvent(
                id=(last[0] if last else 0) + 1,
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
                prev_hash=last[1] if last else GENESIS,
                hash="",
            )
            row.hash = row_hash(row)
            assert row.id is not None
            row.mac = self.anchor.mac(key, row.id, row.hash)
            session.add(row)
            if head is not None and self._extends(session, head, last):
                rows = head.rows + row.id - head.last_id
                advance.append((key, Head(rows, row.id, row.hash, head.keyed_from, row.ts.isoformat())))
            return row

        def advance_head(_row: AuditEvent) -> None:
            if advance:
                self.anchor.write_head(*advance[0])

        with anyio.CancelScope(shield=True):  # the head must follow a committed row
            async with self._lock:
                try:
                    row = await self._store.run(append, then=advance_head)
                finally:
                    if locked:
                        self.anchor.unlock(locked[0])
        return row

    def _anchored(self, session: Session) -> tuple[bytes, Head | None]:
        """The key and the head (None when it cannot be trusted and so must not be moved on).

        The first append makes the key and signs a head over the table as it is: rows written
        before the key existed carry no MAC and are anchored by that head's count and hash.
        """
        key = self.anchor.key()
        if key is None:
            key = self.anchor.create_key()
            keyed = session.exec(select(func.min(AuditEvent.id)).where(col(AuditEvent.mac).is_not(None))).first()
            last = _newest(session)
            count = session.exec(select(func.count()).select_from(AuditEvent)).one()
            if keyed is not None:
                log.error(
                    "the audit key was missing although rows from %s on carry MACs; a new key was made, and "
                    "those rows will not verify",
                    keyed,
                )
            first = keyed if keyed is not None else (last[0] + 1 if last else 1)
            self.anchor.write_head(
                key, Head(count, last[0] if last else 0, last[1] if last else GENESIS, first, utcnow().isoformat())
            )
        head = self.anchor.read_head(key)
        if isinstance(head, str):
            self._warn(
                f"the signed audit head is {'missing' if head == HeadProblem.MISSING else 'not signed by the key'}"
            )
            return key, None
        return key, head

    def _extends(self, session: Session, head: Head, last: Any) -> bool:
        """Whether the table is the head's rows plus rows appended since (a crash between a row
        and its head leaves the head one append behind); if not, the head stays as evidence."""
        if last is None:
            ok = head.last_id == 0
        elif last[0] == head.last_id:
            ok = last[1] == head.last_hash
        else:
            at = (
                session.exec(select(AuditEvent.hash).where(AuditEvent.id == head.last_id)).first()
                if head.last_id
                else GENESIS
            )
            ok = last[0] > head.last_id and at == head.last_hash
        if not ok:
            self._warn(f"the audit table no longer extends its signed head (row {head.last_id} of {head.rows})")
        return ok

    def _warn(self, problem: str) -> None:
        if not self._warned:
            self._warned = True
            log.error("%s: the head is left as it is; run `dockyard audit verify`", problem)

    @asynccontextmanager
    async def record(
        self,
        who: Identity,
        kind: Action,
        target: str | None = None,
        *,
        started: bool = False,
        **detail: Any,
    ) -> AsyncIterator[AuditRecord]:
        """Time the block and write its row: outcome `ok`, or `error` with the error's message.

        With `started`, a `started` row is written first, and the block runs only once it is;
        the final row names it in `started_id`, and a crash leaves it to be marked interrupted.
        If a row cannot be written, the action fails with an AuditWriteError (a cancellation
        still propagates as one; the server log then has the row that was lost).
        """
        rec = AuditRecord(kind, target, dict(detail))
        if started:
            try:
                row = await self.append(who, kind, target=target, outcome="started", detail=rec.detail)
            except Exception as exc:
                log.error(
                    "audit row lost: %s %s by %s/%s not started",
                    kind,
                    target,
                    who.workspace_id,
                    who.user_id,
                    exc_info=True,
                )
                raise AuditWriteError(kind, _reason(exc), started=False) from exc
            rec.detail["started_id"] = row.id
        began = time.perf_counter()
        try:
            yield rec
        except BaseException as exc:
            rec.detail["error"] = str(exc) if isinstance(exc, DockyardError) else type(exc).__name__
            outcome = "cancelled" if _is_cancel(exc) else "error"
            await self._write(who, rec, outcome, began, failure=exc)
            raise
        await self._write(who, rec, "ok", began)

    async def recover(self) -> int:
        """Append an `interrupted` row for every `started` row that never ended (the server
        stopped while it ran); call at start, before any action, with no other server on the
        data dir (its running actions would be marked too). Returns how many."""

        def dangling(session: Session) -> list[AuditEvent]:
            started_id = func.json_extract(AuditEvent.detail, "$.started_id")
            ended = sa_select(started_id).where(col(AuditEvent.outcome) != "started", started_id.is_not(None))
            stmt = select(AuditEvent).where(AuditEvent.outcome == "started", col(AuditEvent.id).not_in(ended))
            return list(session.exec(stmt.order_by(col(AuditEvent.id))).all())

        rows = await self._store.run(dangling)
        for row in rows:
            who = Identity(
                workspace_id=row.workspace_id,
                project_id=row.project_id,
                user_id=row.user_id,
                run_id=row.run_id,
                token_id=row.token_id,
            )
            await self._append(
                who,
                row.kind,
                target=row.target,
                outcome="interrupted",
                detail={"started_id": row.id, "error": _INTERRUPTED},
            )
        if rows:
            log.warning(
                "%d audited actions were interrupted by a stop: %s",
                len(rows),
                ", ".join(f"{r.kind} #{r.id}" for r in rows),
            )
        return len(rows)

    async def _write(
        self, who: Identity, rec: AuditRecord, outcome: str, started: float, failure: BaseException | None = None
    ) -> None:
        try:
            await self.append(
                who, rec.kind, target=rec.target, outcome=outcome, detail=rec.detail, duration_ms=_ms(started)
            )
        except Exception as exc:
            log.error(
                "audit row lost: %s %s by %s/%s ended %s: %s",
                rec.kind,
                rec.target,
                who.workspace_id,
                who.user_id,
                outcome,
                json.dumps(rec.detail, default=str),
                exc_info=True,
            )
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
        before: int | None = None,
    ) -> list[AuditEvent]:
        """Rows matching every filter given, newest first (highest id first), at most `limit`,
        with ids below `before` if given.

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
            if before is not None:
                stmt = stmt.where(col(AuditEvent.id) < before)
            return list(session.exec(stmt.limit(limit)).all())

        return await self._store.run(query)

    async def verify(self, batch: int = _VERIFY_BATCH, against: Export | None = None) -> AuditVerification:
        """Walk the whole chain in id order, `batch` rows at a time, check it against the signed
        head (and an earlier export, if given) and report everything that does not hold."""
        return await verify_chain(self._store, self.anchor, batch, against)

    async def reanchor(self, who: Identity) -> AuditVerification:
        """After an operator has looked into a broken log: put what verify finds on the record
        (an `audit.reanchor` row, with the head file as it was) and sign a new head over the
        table as it is, so rows from now on are anchored again. Damage in the chain itself
        (edited, deleted, recomputed rows) stays visible; only the head is renewed."""
        found = await self.verify()
        try:
            old = self.anchor.head_path.read_text()
        except FileNotFoundError:
            old = None
        await self.append(
            who,
            Action.AUDIT_REANCHOR,
            target=None,
            outcome="ok",
            detail={"findings": [f.model_dump() for f in found.findings], "old_head": old},
        )

        def sign(session: Session) -> None:
            fd = self.anchor.lock()
            try:
                key = self.anchor.key()
                assert key is not None  # the append above made it if it was missing
                previous = self.anchor.read_head(key)
                last = _newest(session)
                count = session.exec(select(func.count()).select_from(AuditEvent)).one()
                keyed = session.exec(select(func.min(AuditEvent.id)).where(col(AuditEvent.mac).is_not(None))).one()
                first = previous.keyed_from if isinstance(previous, Head) else keyed
                assert last is not None and first is not None  # the append above wrote a keyed row
                self.anchor.write_head(key, Head(count, last[0], last[1], first, utcnow().isoformat()))
            finally:
                self.anchor.unlock(fd)

        with anyio.CancelScope(shield=True):
            async with self._lock:
                await self._store.run(sign)
        self._warned = False
        return found

    async def export(self) -> tuple[list[dict[str, Any]], dict[str, object] | None]:
        """Every row (all columns, in id order) and the signed head as the file holds it."""
        key = self.anchor.key()
        head = self.anchor.read_head(key) if key is not None else None
        signed = self.anchor.signed(key, head) if key is not None and isinstance(head, Head) else None

        def rows(session: Session) -> list[dict[str, Any]]:
            return [
                row.model_dump(mode="json") for row in session.exec(select(AuditEvent).order_by(col(AuditEvent.id)))
            ]

        return await self._store.run(rows), signed


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


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # a zone that pushes year 1 or 9999 past the calendar: before or after every row
        return (datetime.min if moment.year == 1 else datetime.max).replace(tzinfo=UTC)


def _reason(exc: Exception) -> str:
    """A failed write in a few words: the database's own message, never the statement or its values."""
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error
    return str(orig) if orig is not None and str(orig) else type(exc).__name__


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def _is_cancel(exc: BaseException) -> bool:
    return isinstance(exc, anyio.get_cancelled_exc_class())
