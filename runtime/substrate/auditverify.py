"""Verifying the audit log: its chain, its MACs, its signed head and, if given, an earlier export.

Each kind of damage has its own finding, so an operator can tell what was done:

- `edited`: a row's content no longer matches its hash;
- `deleted`: ids are missing before a row (rows deleted from the middle, or the first rows);
- `reordered`: a row does not link to the row before it, with no id missing (rows swapped,
  moved or replaced);
- `recomputed`: a row's hash and link hold but its MAC does not (or it has none where one is
  due): the chain was recomputed by someone without the key;
- `truncated`: the table ends before the row the signed head (or an export) names, or that row
  is another one: rows were cut from the tail;
- `emptied`: the table is empty but the signed head says it held rows;
- `head_missing`, `head_forged`: the head file is gone, or its signature does not hold;
- `key_missing`: the key is gone although rows carry MACs, so nothing keyed can be checked;
- `export_mismatch`: a row differs from the same row in an earlier export.

A head behind the table by rows that chain and carry good MACs is not damage: a crash between a
row's commit and the head's write leaves it so (reported as `unanchored_rows`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session, col, select

from dockyard.runtime.substrate.auditanchor import GENESIS, AuditAnchor, Head, HeadProblem, row_hash
from dockyard.runtime.substrate.models import AuditFinding, AuditVerification
from dockyard.runtime.substrate.store import AuditEvent, Store

__all__ = ["Export", "load_export", "verify_chain"]


@dataclass
class Export:
    """What `dockyard audit export` wrote: each row's hash by id, and the head it carried."""

    hashes: dict[int, str] = field(default_factory=dict)
    head: dict[str, Any] | None = None


def load_export(text: str) -> Export:
    """Read an export (JSON lines: one row per line, then `{"head": ...}`)."""
    export = Export()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            if "head" in item and "id" not in item:
                export.head = item["head"]
            else:
                export.hashes[int(item["id"])] = str(item["hash"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"line {number} of the export is not an audit row or head") from exc
    return export


@dataclass
class _Walk:
    """Where the walk is: the last row seen and what it found."""

    checked: int = 0
    previous: int = 0
    expected: str = GENESIS
    seen_mac: bool = False
    legacy: int = 0
    through_head: int = 0
    head_hash: str | None = None
    findings: list[AuditFinding] = field(default_factory=list)


async def verify_chain(store: Store, anchor: AuditAnchor, batch: int, against: Export | None) -> AuditVerification:
    """Walk every row in id order and compare the result with the head and `against`."""
    key = anchor.key(fresh=True)
    head: Head | None = None
    walk = _Walk()
    if key is not None:
        got = anchor.read_head(key)
        if got == HeadProblem.MISSING:
            walk.findings.append(
                _found(
                    "head_missing",
                    None,
                    "the signed head (audit-head.json) is missing, so rows cut from "
                    "the tail or an emptied table cannot be told; it was deleted",
                )
            )
        elif got == HeadProblem.FORGED:
            walk.findings.append(
                _found(
                    "head_forged",
                    None,
                    "the head file's signature does not hold under the audit key: "
                    "it was written or changed by someone without the key",
                )
            )
        elif isinstance(got, Head):
            head = got
    exported = against.hashes if against is not None else {}
    after, broken = 0, False
    while not broken:

        def page(session: Session, after: int = after) -> list[AuditEvent]:
            stmt = select(AuditEvent).where(col(AuditEvent.id) > after).order_by(col(AuditEvent.id)).limit(batch)
            return list(session.exec(stmt).all())

        rows = await store.run(page)
        for row in rows:
            finding = _check(row, walk, anchor, key, head, exported)
            if finding is not None:
                walk.findings.insert(0, finding)
                broken = True
                break
        if len(rows) < batch:
            break
        after = walk.previous
    if not broken:
        walk.findings += _against_head(walk, head) + _against_export(walk, exported)
    if key is None and walk.seen_mac:
        walk.findings.append(
            _found(
                "key_missing",
                None,
                "the audit key file is missing although rows carry MACs: it was "
                "removed, so no MAC or head can be checked",
            )
        )
    first = walk.findings[0] if walk.findings else None
    return AuditVerification(
        rows_checked=walk.checked,
        intact=not walk.findings,
        first_broken_id=next((f.row_id for f in walk.findings if f.row_id is not None), None),
        reason=first.reason if first else None,
        findings=walk.findings,
        head_rows=head.rows if head else None,
        unanchored_rows=walk.checked - walk.through_head if head and not broken else None,
        legacy_rows=walk.legacy,
    )


def _check(
    row: AuditEvent, walk: _Walk, anchor: AuditAnchor, key: bytes | None, head: Head | None, exported: dict[int, str]
) -> AuditFinding | None:
    """The first thing wrong with one row, or None (then the walk moves past it)."""
    assert row.id is not None
    walk.checked += 1
    if row.id != walk.previous + 1:
        where = "from the chain's start" if walk.previous == 0 else "from the middle"
        return _found("deleted", row.id, f"{_ids(walk.previous + 1, row.id - 1)} deleted {where}, just before it")
    if row.hash != row_hash(row):
        return _found("edited", row.id, "its content does not match its hash: the row was edited")
    if row.prev_hash != walk.expected:
        before = "the chain's start" if walk.previous == 0 else f"row {walk.previous}'s hash"
        return _found(
            "reordered",
            row.id,
            f"its prev_hash does not match {before} although no id is missing: rows were swapped, moved or replaced",
        )
    keyed = walk.seen_mac or (head is not None and row.id >= head.keyed_from)
    if row.mac is None:
        if keyed:
            return _found(
                "recomputed",
                row.id,
                "it carries no MAC although every row after the key was made must: it was "
                "written or rewritten without the audit key",
            )
        walk.legacy += 1
    else:
        walk.seen_mac = True
        if key is not None and not anchor.mac_ok(key, row.id, row.hash, row.mac):
            return _found(
                "recomputed",
                row.id,
                "its hash matches its content and links to the row before it, but its MAC "
                "does not hold under the audit key: the chain was recomputed by someone without the key",
            )
    if row.id in exported and exported[row.id] != row.hash:
        return _found("export_mismatch", row.id, "it is not the row with this id in the exported copy: it was replaced")
    walk.expected, walk.previous = row.hash, row.id
    if head is not None and row.id <= head.last_id:
        walk.through_head = walk.checked
        if row.id == head.last_id:
            walk.head_hash = row.hash
    return None


def _against_head(walk: _Walk, head: Head | None) -> list[AuditFinding]:
    if head is None or head.rows == 0:
        return []
    if walk.checked == 0:
        return [
            _found(
                "emptied",
                None,
                f"the table is empty, but the signed head says it held {head.rows} rows up to row "
                f"{head.last_id}: every row was deleted",
            )
        ]
    if walk.previous < head.last_id:
        return [
            _found(
                "truncated",
                None,
                f"the table ends at row {walk.previous}, but the signed head says {head.rows} rows "
                f"up to row {head.last_id}: {_ids(walk.previous + 1, head.last_id)} cut from the tail",
            )
        ]
    if walk.head_hash != head.last_hash:
        return [
            _found(
                "truncated",
                head.last_id,
                f"row {head.last_id} is not the row the signed head names: rows were cut "
                "from the tail and others written in their place",
            )
        ]
    if walk.through_head != head.rows:
        return [
            _found(
                "deleted",
                None,
                f"the signed head counts {head.rows} rows up to row {head.last_id}, the table "
                f"{walk.through_head}: rows were deleted",
            )
        ]
    return []


def _against_export(walk: _Walk, exported: dict[int, str]) -> list[AuditFinding]:
    last = max(exported, default=0)
    if last > walk.previous:
        return [
            _found(
                "truncated",
                None,
                f"the exported copy has rows up to {last}, the table ends at row {walk.previous}: "
                f"{_ids(walk.previous + 1, last)} cut from the tail (or the table was rolled back)",
            )
        ]
    return []


def _ids(first: int, last: int) -> str:
    return f"row {first} was" if first == last else f"rows {first}..{last} were"


def _found(kind: str, row_id: int | None, reason: str) -> AuditFinding:
    return AuditFinding(kind=kind, row_id=row_id, reason=reason)
