"""The audit log's anchors outside the database: a key and a signed head.

The key (`audit-key` in the data dir, readable by its owner only, made on first use) never
enters the store. Every row carries a MAC: HMAC-SHA256 under the key of its id and hash, so
someone who can write the database but not read the key cannot recompute a row and its MAC
after editing it. The head (`audit-head.json`) holds the row count, the last row's id and hash,
and the first id that must carry a MAC, signed with the same key; it is replaced atomically
(temporary file, fsync, rename) after every append, so rows cut from the tail, or the whole
table emptied, no longer match it.

Appends from every process on the data dir take an exclusive lock on `audit-head.lock` from
reading the last row to writing the head, so the head always follows the rows in order. A
crash between a row's commit and the head's write leaves the head behind by that one row,
which the verifier accepts because the row's MAC proves who wrote it. If the table no longer
extends the head (rows were cut or replaced), the head is left as it is: it is the evidence.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from dockyard.runtime.substrate.store import AuditEvent

__all__ = ["GENESIS", "AuditAnchor", "Head", "HeadProblem", "row_hash"]

log = logging.getLogger(__name__)

GENESIS = "0" * 64


def row_hash(row: AuditEvent) -> str:
    """The SHA-256 of a row's content and its predecessor's hash (not its id or MAC)."""
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


class HeadProblem:
    """Why a head could not be read."""

    MISSING = "head_missing"
    FORGED = "head_forged"


@dataclass(frozen=True)
class Head:
    """The signed state of the table after the last append: what a cut can no longer match."""

    rows: int
    last_id: int
    last_hash: str
    keyed_from: int  # rows with a smaller id predate the key and carry no MAC
    ts: str

    def body(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()


class AuditAnchor:
    """The key and the head of one data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.key_path = data_dir / "audit-key"
        self.head_path = data_dir / "audit-head.json"
        self._lock_path = data_dir / "audit-head.lock"
        self._key: bytes | None = None

    # -- the key --------------------------------------------------------------------------

    def key(self, fresh: bool = False) -> bytes | None:
        """The key, or None if there is none; `fresh` reads the file again (verify does)."""
        if self._key is None or fresh:
            self._key = None
            try:
                self._key = bytes.fromhex(self.key_path.read_text().strip())
            except FileNotFoundError:
                return None
        return self._key

    def create_key(self) -> bytes:
        """Make the key (32 random bytes, owner-only) unless another process just did."""
        self.key_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            log.info("created the audit key %s", self.key_path)
        self._key = None
        key = self.key()
        assert key is not None
        return key

    def mac(self, key: bytes, row_id: int, row_hash: str) -> str:
        """A row's MAC: it binds the row's hash to its place in the table."""
        return hmac.new(key, f"{row_id}:{row_hash}".encode(), hashlib.sha256).hexdigest()

    def mac_ok(self, key: bytes, row_id: int, row_hash: str, mac: str) -> bool:
        return hmac.compare_digest(self.mac(key, row_id, row_hash), mac)

    # -- the head -------------------------------------------------------------------------

    def read_head(self, key: bytes) -> Head | str:
        """The head if its signature holds under `key`; else a HeadProblem."""
        try:
            data = json.loads(self.head_path.read_text())
        except FileNotFoundError:
            return HeadProblem.MISSING
        except ValueError:
            return HeadProblem.FORGED
        try:
            signature = data.pop("mac")
            head = Head(**data)
            expected = hmac.new(key, head.body(), hashlib.sha256).hexdigest()
        except (KeyError, TypeError, AttributeError):
            return HeadProblem.FORGED
        if not isinstance(signature, str) or not hmac.compare_digest(expected, signature):
            return HeadProblem.FORGED
        return head

    def signed(self, key: bytes, head: Head) -> dict[str, object]:
        """The head with its signature, as the file and an export hold it."""
        return {**asdict(head), "mac": hmac.new(key, head.body(), hashlib.sha256).hexdigest()}

    def write_head(self, key: bytes, head: Head) -> None:
        """Replace the head atomically: a reader sees the old one or the new one, whole.

        Written through a rename, so a killed server never leaves a torn head. Like the store
        (SQLite in WAL mode with synchronous=NORMAL), it is not synced to disk on every append:
        what a process crash cannot take back is kept, and only a power loss may leave the head
        and the table's last commits out of step (verify then says so). Syncing the head alone
        would not keep the two in step, and it cost an fsync on every audited action.
        """
        tmp = self.head_path.with_name(f".{self.head_path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump(self.signed(key, head), fh, sort_keys=True)
        os.replace(tmp, self.head_path)

    # -- the lock -------------------------------------------------------------------------

    def lock(self) -> int:
        """Take the append lock (blocking; call from a worker thread); returns what to unlock."""
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    @staticmethod
    def unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
