"""Snapshots: a sandbox's /workspace and home saved as tars, and restored into a new sandbox.

A snapshot folder counts only once its row is written; one left without a row (a failure, or
a crash mid-way) is removed, at once or at the next start (`sweep_partial_snapshots`). A
restore first copies the tars entry by entry through `copy_checked`, so a tampered snapshot
is refused before any runtime is claimed.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import anyio
from sqlmodel import Session, col, select

from dockyard.runtime.runtimes.files import WORKSPACE
from dockyard.runtime.runtimes.provision import HOME, SANDBOX_GID, SANDBOX_UIDS
from dockyard.runtime.runtimes.sandboxaccess import SandboxAccess
from dockyard.runtime.runtimes.snapshotcheck import copy_checked
from dockyard.runtime.substrate.actions import Action
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.docker import DockerBackend
from dockyard.runtime.substrate.errors import (
    QuotaExceededError,
    SizeLimitError,
    SnapshotNotFoundError,
    TimeLimitError,
)
from dockyard.runtime.substrate.listings import SnapshotPage, Window
from dockyard.runtime.substrate.models import SnapshotInfo
from dockyard.runtime.substrate.settings import Identity, Settings
from dockyard.runtime.substrate.store import Snapshot, Store
from dockyard.runtime.substrate.tokens import TokenService

__all__ = ["SnapshotService"]

log = logging.getLogger(__name__)

_TARS = {"workspace.tar": WORKSPACE, "home.tar": HOME}  # a snapshot's files, and where each goes
_RESTORING = ".restoring-"  # a checked copy of a snapshot being restored, in the snapshots dir


class SnapshotService:
    """Takes, deletes, checks and restores snapshots of a workspace's sandboxes."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        audit: AuditLog,
        docker: DockerBackend,
        tokens: TokenService,
        access: SandboxAccess,
    ) -> None:
        self._settings = settings
        self._limits = settings.sandbox
        self._store = store
        self._audit = audit
        self._docker = docker
        self._tokens = tokens
        self._access = access
        self._locks: dict[str, anyio.Lock] = {}

    async def take(self, who: Identity, sandbox_id: str, label: str | None) -> SnapshotInfo:
        """Save /workspace and the home directory, consistent: the sandbox is paused meanwhile.

        A workspace's snapshots share one quota (quotas.workspace_snapshot_mb): the copy stops
        when it would pass what is left. One snapshot at a time per workspace, so concurrent ones
        cannot each count the same room."""
        row = await self._access.owned(who, sandbox_id, Action.SANDBOX_SNAPSHOT)
        snapshot_id = f"snp_{secrets.token_hex(8)}"
        folder = self._settings.snapshots_dir / snapshot_id
        async with self._audit.record(
            who, Action.SANDBOX_SNAPSHOT, sandbox_id, started=True, snapshot_id=snapshot_id, label=label
        ) as rec:
            async with self._lock(who.workspace_id):
                room = await self._room(who.workspace_id)
                try:
                    size = await self._archive(row.container_id, folder, room)
                    snap = await self._store.add(
                        Snapshot(
                            id=snapshot_id,
                            sandbox_id=sandbox_id,
                            template=row.template,
                            label=label,
                            workspace_id=who.workspace_id,
                            project_id=who.project_id,
                            user_id=who.user_id,
                            path=str(folder),
                            size_bytes=size,
                        )
                    )
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(shutil.rmtree, folder, True)
                    raise
            rec.detail["size_bytes"] = size
        return SnapshotInfo(
            snapshot_id=snap.id, sandbox_id=sandbox_id, label=label, size_bytes=size, created_at=snap.created_at
        )

    async def delete(self, who: Identity, snapshot_id: str) -> None:
        """Delete a snapshot of the caller's workspace (another user's needs workspace:admin),
        giving its space back to the workspace's snapshot quota."""
        snap = await self.owned(who, snapshot_id)
        await self._tokens.may_end(who, snap.user_id, Action.SNAPSHOT_DELETE, snapshot_id, "snapshot")
        async with self._audit.record(who, Action.SNAPSHOT_DELETE, snapshot_id, size_bytes=snap.size_bytes):

            def forget(session: Session) -> None:
                found = session.get(Snapshot, snapshot_id)
                if found is not None:
                    session.delete(found)

            await self._store.run(forget)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, snap.path, True)

    async def list_page(self, who: Identity, sandbox_id: str | None, limit: int, cursor: str | None) -> SnapshotPage:
        """A page of the snapshots in the caller's reach, newest first: its workspace's (of one
        sandbox, if `sandbox_id` says so), or for a sandbox's own token that sandbox's only."""
        window = Window("snapshot_list", who, limit, cursor)

        def query(session: Session) -> list[Snapshot]:
            stmt = select(Snapshot).where(Snapshot.workspace_id == who.workspace_id)
            for only in {who.sandbox_id, sandbox_id} - {None}:
                stmt = stmt.where(Snapshot.sandbox_id == only)
            return list(session.exec(window.apply(stmt, Snapshot)).all())

        rows, next_cursor = window.cut(await self._store.run(query))
        return SnapshotPage(
            snapshots=[
                SnapshotInfo(
                    snapshot_id=row.id,
                    sandbox_id=row.sandbox_id,
                    label=row.label,
                    size_bytes=row.size_bytes,
                    created_at=row.created_at,
                )
                for row in rows
            ],
            next_cursor=next_cursor,
        )

    async def owned(self, who: Identity, snapshot_id: str) -> Snapshot:
        """A snapshot of the caller's workspace whose folder is still there."""
        snap = await self._store.get(Snapshot, snapshot_id)
        if snap is None or snap.workspace_id != who.workspace_id or not await anyio.Path(snap.path).is_dir():
            raise SnapshotNotFoundError(snapshot_id)
        return snap

    async def checked_copy(self, snapshot: Snapshot) -> Path:
        """Copy the snapshot's tars, entry by entry through `copy_checked`, into a folder of the
        data dir that only this restore uses; raises UnsafeSnapshotError for a tampered one.
        The caller removes the folder when the restore is done."""
        folder = Path(tempfile.mkdtemp(prefix=_RESTORING, dir=self._settings.snapshots_dir))

        def copy() -> None:
            for name in _TARS:
                with open(Path(snapshot.path) / name, "rb") as source, open(folder / name, "wb") as sink:
                    copy_checked(snapshot.id, source, sink, SANDBOX_UIDS, SANDBOX_GID)

        try:
            await anyio.to_thread.run_sync(copy)
        except BaseException as exc:
            await anyio.to_thread.run_sync(shutil.rmtree, folder, True)
            if isinstance(exc, FileNotFoundError):  # deleted a moment ago
                raise SnapshotNotFoundError(snapshot.id) from None
            raise
        return folder

    async def restore(self, container_id: str, folder: Path) -> None:
        """Unpack a checked copy's tars into the container."""
        for name, path in _TARS.items():
            async with await anyio.open_file(folder / name, "rb") as source:
                await self._docker.put_archive(container_id, path, source.wrapped)

    async def sweep_partial_snapshots(self) -> int:
        """At start: remove snapshot folders that have no row (a snapshot cut short by a crash)."""
        root = self._settings.snapshots_dir
        folders = [p for p in root.glob("snp_*") if p.is_dir()] if root.is_dir() else []
        for path in root.glob(f"{_RESTORING}*") if root.is_dir() else []:  # copies of a restore cut short
            await anyio.to_thread.run_sync(shutil.rmtree, path, True)
        if not folders:
            return 0

        def known(session: Session) -> set[str]:
            return set(session.exec(select(Snapshot.id).where(col(Snapshot.id).in_([p.name for p in folders]))).all())

        kept = await self._store.run(known)
        partial = [p for p in folders if p.name not in kept]
        for path in partial:
            log.warning("removing snapshot %s: it was cut short (no record of it was written)", path.name)
            await anyio.to_thread.run_sync(shutil.rmtree, path, True)
        return len(partial)

    def _lock(self, workspace_id: str) -> anyio.Lock:
        return self._locks.setdefault(workspace_id, anyio.Lock())

    async def _room(self, workspace_id: str) -> _Room:
        """What the workspace's snapshots may still take; refuses when nothing is left."""
        quota_mb = self._settings.quotas.workspace_snapshot_mb

        def used(session: Session) -> int:
            sizes = session.exec(select(Snapshot.size_bytes).where(Snapshot.workspace_id == workspace_id)).all()
            return sum(sizes)

        taken = await self._store.run(used)
        if not quota_mb:
            return _Room(self._limits.snapshot_max_bytes, None, taken)
        left = (quota_mb << 20) - taken
        if left <= 0:
            raise QuotaExceededError(
                f"workspace '{workspace_id}' has used its snapshot quota: its snapshots take {taken >> 20} MiB of "
                f"{quota_mb} MiB (quotas.workspace_snapshot_mb); delete snapshots it no longer needs with snapshot_delete"
            )
        return _Room(self._limits.snapshot_max_bytes, quota_mb, taken)

    async def _archive(self, container_id: str, folder: Path, room: _Room) -> int:
        """Stream /workspace and the home into `folder`, paused, bounded in size and time.

        The folder counts as a snapshot only once its row is written: one left without a row
        (a failure, or a crash mid-way) is removed, here or by `sweep_partial_snapshots`."""
        limits = self._limits
        await anyio.Path(folder).mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + limits.snapshot_timeout_s
        await self._docker.pause(container_id)
        try:
            size = 0
            for name, path in _TARS.items():
                async with await anyio.open_file(folder / name, "wb") as sink:
                    try:
                        size += await self._docker.get_archive_to(
                            container_id, f"{path}/.", sink.wrapped, limit=room.bytes - size, deadline=deadline
                        )
                    except SizeLimitError:
                        raise SizeLimitError(room.over()) from None
                    except TimeLimitError:
                        raise TimeLimitError(
                            f"the snapshot took longer than {limits.snapshot_timeout_s:g} s (sandbox.snapshot_timeout_s); "
                            "the sandbox runs on unchanged; make the workspace smaller and snapshot again"
                        ) from None
            return size
        finally:
            with anyio.CancelScope(shield=True):
                await self._docker.unpause(container_id)


class _Room:
    """The bytes one snapshot may take: the per-snapshot limit, or what is left of the
    workspace's snapshot quota when that is less."""

    def __init__(self, max_bytes: int, quota_mb: int | None, taken: int) -> None:
        self.quota_mb, self.taken = quota_mb, taken
        self.by_quota = quota_mb is not None and (quota_mb << 20) - taken < max_bytes
        self.bytes = (quota_mb << 20) - taken if self.by_quota and quota_mb is not None else max_bytes

    def over(self) -> str:
        """Why a snapshot that grew past this room stopped, and what to do."""
        if self.by_quota:
            return (
                f"the snapshot would pass the workspace's snapshot quota of {self.quota_mb} MiB "
                f"(quotas.workspace_snapshot_mb; its snapshots take {self.taken >> 20} MiB): nothing was saved and the "
                "sandbox runs on unchanged; delete snapshots it no longer needs with snapshot_delete, or keep less"
            )
        return (
            f"the snapshot is over its limit of {self.bytes} bytes (sandbox.snapshot_max_bytes); "
            "remove what need not be kept (build output, caches) and snapshot again"
        )
