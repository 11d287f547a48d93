"""Reading the audit log a page at a time: each page within the result budget, the next one
named by an opaque cursor that only this server can make.

A cursor is the id to continue below, bound to the workspace and the filters of the query
that made it and signed with a key the server makes when it starts: a cursor that was edited,
made up, or given for another query or workspace is refused, and one from before a restart
is refused too (start again without it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from datetime import datetime

from dockyard.runtime.substrate.audit import AuditLog, audit_entry
from dockyard.runtime.substrate.errors import InvalidRequestError
from dockyard.runtime.substrate.models import AuditEntry, AuditPage

__all__ = ["AuditPages"]

_BAD_CURSOR = (
    "cursor is not one this server gave for this query (it was changed, belongs to other filters or "
    "another workspace, or the server restarted since); leave cursor out to start from the newest rows"
)


class AuditPages:
    """Pages of the audit log that fit the result budget, with signed cursors."""

    def __init__(self, audit: AuditLog, budget_chars: int) -> None:
        self._audit = audit
        self._budget = budget_chars
        self._key = secrets.token_bytes(32)

    async def read(
        self,
        *,
        workspace_id: str | None,
        actor: str | None,
        kind: str | None,
        since: datetime | None,
        until: datetime | None,
        limit: int,
        details: bool,
        cursor: str | None,
    ) -> AuditPage:
        """Up to `limit` rows, newest first, as many as fit the budget; `details` keeps each row's detail."""
        query = json.dumps([workspace_id, actor, kind, str(since), str(until)])
        before = self._opened(cursor, query) if cursor else None
        rows = await self._audit.query(
            workspace_id=workspace_id, actor=actor, kind=kind, since=since, until=until, limit=limit + 1, before=before
        )
        entries: list[AuditEntry] = []
        used = 200  # the page's own fields
        for row in rows[:limit]:
            entry = audit_entry(row) if details else audit_entry(row).model_copy(update={"detail": None})
            cost = len(entry.model_dump_json())
            if entries and used + cost > self._budget:
                break
            entries.append(entry)
            used += cost
        more = len(rows) > len(entries)
        return AuditPage(
            rows=entries,
            more=more,
            next_cursor=self._made(entries[-1].id, query) if more and entries else None,
        )

    def _made(self, before: int, query: str) -> str:
        body = json.dumps({"b": before}).encode()
        mac = hmac.new(self._key, body + query.encode(), hashlib.sha256).digest()[:16]
        return base64.urlsafe_b64encode(mac + body).decode().rstrip("=")

    def _opened(self, cursor: str, query: str) -> int:
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequestError(_BAD_CURSOR) from exc
        mac, body = raw[:16], raw[16:]
        if not hmac.compare_digest(mac, hmac.new(self._key, body + query.encode(), hashlib.sha256).digest()[:16]):
            raise InvalidRequestError(_BAD_CURSOR)
        return int(json.loads(body)["b"])
