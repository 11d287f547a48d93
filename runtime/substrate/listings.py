"""Paged listings: compact rows, newest first, and the opaque cursor that continues a page.

A listing is ordered by (created_at, id), newest first. Its cursor names the last row a page
held, the list it came from and the workspace of the caller it was made for, sealed with an
HMAC under a key this process draws at start: a cursor that was altered, made up, taken to
another list or another workspace, or kept past a restart of the server is refused, and the
caller starts again without one. A cursor only ever moves within the caller's own rows: every
query is filtered by the caller's reach before the cursor is applied.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field
from sqlmodel import col, or_

from dockyard.runtime.substrate.errors import InvalidRequestError
from dockyard.runtime.substrate.models import SnapshotInfo
from dockyard.runtime.substrate.settings import Identity

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "DispatchPage",
    "DispatchRow",
    "SnapshotPage",
    "TeamPage",
    "TeamRow",
    "Window",
    "clip",
]

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
_KEY = secrets.token_bytes(32)  # per process: a cursor does not outlive the server that made it


class DispatchRow(BaseModel):
    """One dispatch, in a line."""

    dispatch_id: str
    status: str = Field(description="queued, running, completed, failed, cancelled or interrupted.")
    mode: str
    runner: str
    task_summary: str = Field(description="The task's summary, cut at 200 characters.")
    user_id: str = Field(description="Who started it.")
    sandbox_id: str | None = None
    created_at: datetime
    finished_at: datetime | None = None


class DispatchPage(BaseModel):
    """A page of the caller's dispatches, newest first."""

    dispatches: list[DispatchRow]
    next_cursor: str | None = Field(None, description="Pass as cursor for the next page; null: this was the last.")


class TeamRow(BaseModel):
    """One team, in a line."""

    team_id: str
    name: str
    status: str = Field(description="active, or shut down.")
    lead_user_id: str = Field(description="The user who created (leads) it.")
    members: int = Field(description="How many members it has.")
    open_tasks: int = Field(description="Tasks on its list that nobody has claimed yet.")
    created_at: datetime


class TeamPage(BaseModel):
    """A page of the caller's teams, newest first."""

    teams: list[TeamRow]
    next_cursor: str | None = Field(None, description="Pass as cursor for the next page; null: this was the last.")


class SnapshotPage(BaseModel):
    """A page of the caller's snapshots, newest first."""

    snapshots: list[SnapshotInfo]
    next_cursor: str | None = Field(None, description="Pass as cursor for the next page; null: this was the last.")


def clip(text: str, limit: int = 200) -> str:
    """`text` cut at `limit` characters, with a mark where it was cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Window:
    """Where a page of one list starts for one caller, and the cursor of the page after it."""

    def __init__(self, listing: str, who: Identity, limit: int, cursor: str | None) -> None:
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidRequestError(f"limit must be between 1 and {MAX_LIMIT}; got {limit}")
        self._listing = listing
        self._workspace = who.workspace_id
        self.limit = limit
        self._after = self._open(cursor) if cursor is not None else None

    def apply(self, stmt: Any, model: Any) -> Any:
        """`stmt` ordered newest first, from the cursor's row on, one row more than a page
        (to know whether another page follows)."""
        if self._after is not None:
            moment, last_id = self._after
            stmt = stmt.where(
                or_(
                    col(model.created_at) < moment,
                    (col(model.created_at) == moment) & (col(model.id) < last_id),
                )
            )
        return stmt.order_by(col(model.created_at).desc(), col(model.id).desc()).limit(self.limit + 1)

    def cut(self, rows: list[Any]) -> tuple[list[Any], str | None]:
        """The page's rows and the cursor of the next page (None when this is the last)."""
        if len(rows) <= self.limit:
            return rows, None
        rows = rows[: self.limit]
        last = rows[-1]
        return rows, self._seal({"t": _utc(last.created_at).isoformat(), "i": last.id})

    def _seal(self, position: dict[str, str]) -> str:
        body = json.dumps({"l": self._listing, "w": self._workspace, **position}, separators=(",", ":")).encode()
        return _b64(body) + "." + _b64(_mac(body))

    def _open(self, cursor: str) -> tuple[datetime, str]:
        refused = InvalidRequestError(
            f"this cursor is not one {self._listing} gave you (or the server restarted since); "
            "call it again without a cursor to start from the newest"
        )
        encoded, _, mac = cursor.partition(".")
        try:
            body, seal = _unb64(encoded), _unb64(mac)
        except (ValueError, binascii.Error):
            raise refused from None
        if not hmac.compare_digest(seal, _mac(body)):
            raise refused
        fields = json.loads(body)
        if fields.get("l") != self._listing or fields.get("w") != self._workspace:
            raise refused
        return _utc(datetime.fromisoformat(fields["t"])), str(fields["i"])


def _utc(moment: datetime) -> datetime:
    """A stored time, in UTC (SQLite hands it back without a zone; it was stored as UTC)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _mac(body: bytes) -> bytes:
    return hmac.new(_KEY, body, hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    if not text or len(text) > 1024:
        raise ValueError("empty or too long")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
