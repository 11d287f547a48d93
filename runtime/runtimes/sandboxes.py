"""Sandboxes: a workspace's claim of a pooled runtime, from sandbox_create to its end."""

from __future__ import annotations

import builtins
import logging
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
from sqlmodel import Session, col, func, select

from dockyard.runtime.runtimes.commands import OutputCallback, run_command
from dockyard.runtime.runtimes.files import WORKSPACE, FileOps, decode_content, workspace_path
from dockyard.runtime.runtimes.images import BuildState
from dockyard.runtime.runtimes.pool import Bind, PoolManager
from dockyard.runtime.runtimes.ports import PortForwarder
from dockyard.runtime.runtimes.provision import HOME, SANDBOX_GID, SANDBOX_UIDS, USER
from dockyard.runtime.runtimes.snapshotcheck import copy_checked
from dockyard.runtime.runtimes.supervisor import Supervisors
from dockyard.runtime.substrate.actions import Action
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.docker import DockerBackend
from dockyard.runtime.substrate.errors import (
    InvalidRequestError,
    NetworkNotAllowedError,
    QuotaExceededError,
    SandboxLostError,
    SandboxNotFoundError,
    SandboxPausedError,
    SizeLimitError,
    SnapshotNotFoundError,
    TemplateNotFoundError,
    TimeLimitError,
)
from dockyard.runtime.substrate.models import (
    ExecResult,
    FileContent,
    FileListing,
    FileWritten,
    PortInfo,
    SandboxInfo,
    SnapshotInfo,
)
from dockyard.runtime.substrate.runs import tree_limit
from dockyard.runtime.substrate.settings import Identity, NetworkMode, Settings, TemplateSettings
from dockyard.runtime.substrate.store import Member, Runtime, Sandbox, SandboxStatus, Snapshot, Store, utcnow
from dockyard.runtime.substrate.tokens import TokenService

__all__ = ["SandboxService"]

log = logging.getLogger(__name__)

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
BuildNotify = Callable[[BuildState], Awaitable[None]]
_TARS = {"workspace.tar": WORKSPACE, "home.tar": HOME}  # a snapshot's files, and where each goes
_RESTORING = ".restoring-"  # a checked copy of a snapshot being restored, in the snapshots dir


class SandboxService:
    """Creates, runs commands in, snapshots and destroys sandboxes; audits every action."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        audit: AuditLog,
        docker: DockerBackend,
        pools: PoolManager,
        supervisors: Supervisors,
        tokens: TokenService,
    ) -> None:
        self._settings = settings
        self._limits = settings.sandbox
        self._store = store
        self._audit = audit
        self._docker = docker
        self._pools = pools
        self._supervisors = supervisors
        self._tokens = tokens
        self._files = FileOps(supervisors)
        self._snapshot_locks: dict[str, anyio.Lock] = {}
        self.ports = PortForwarder(docker, USER)

    # -- lifecycle ----------------------------------------------------------------------

    async def create(
        self,
        who: Identity,
        *,
        template: str | None = None,
        network: NetworkMode | None = None,
        cpus: float | None = None,
        memory_mb: int | None = None,
        env: dict[str, str] | None = None,
        ttl_s: int | None = None,
        from_snapshot: str | None = None,
        notify: BuildNotify | None = None,
    ) -> SandboxInfo:
        """Start a sandbox from a template (and optionally a snapshot) and return it."""
        async with self._audit.record(
            who, Action.SANDBOX_CREATE, template=template, from_snapshot=from_snapshot
        ) as rec:
            snapshot = await self._owned_snapshot(who, from_snapshot) if from_snapshot else None
            name = template or (snapshot.template if snapshot else self._limits.default_template)
            rec.detail["template"] = name
            tpl = self._template(name)
            spec_network = self._network(network or tpl.network)
            cpus = self._capped("cpus", cpus or tpl.cpus, self._limits.max_cpus)
            memory_mb = int(self._capped("memory_mb", memory_mb or tpl.memory_mb, self._limits.max_memory_mb))
            ttl = self._ttl(ttl_s)
            env = _checked_env(env)
            sandbox_id = f"sbx_{secrets.token_hex(8)}"
            rec.target = sandbox_id

            within_quotas = self._quota_check(who)
            await self._store.run(within_quotas)  # early, so a refused call starts nothing

            def bind(session: Session, runtime: Runtime) -> None:
                within_quotas(session)  # again, in the claim's own transaction
                runtime.sandbox_id = sandbox_id
                session.add(
                    Sandbox(
                        id=sandbox_id,
                        runtime_id=runtime.id,
                        container_id=runtime.container_id or "",
                        template=name,
                        network=spec_network,
                        cpus=cpus,
                        memory_mb=memory_mb,
                        env=env,
                        workspace_id=who.workspace_id,
                        project_id=who.project_id,
                        user_id=who.user_id,
                        run_id=who.run_id,
                        token_id=who.token_id,
                        from_snapshot=from_snapshot,
                        expires_at=utcnow() + timedelta(seconds=ttl) if ttl else None,
                    )
                )

            # checked before anything is claimed: a snapshot that fails the check holds nothing
            checked = await self._checked_copy(snapshot) if snapshot is not None else None
            try:
                lease = await self._pools.claim(name, who.workspace_id, bind, network=spec_network, notify=notify)
                try:
                    if (cpus, memory_mb) != (lease.runtime.cpus, lease.runtime.memory_mb):
                        await self._pools.resize(lease.runtime.id, cpus, memory_mb)
                    if checked is not None:
                        await self._restore(lease.runtime.container_id or "", checked)
                    expires = utcnow() + timedelta(seconds=ttl) if ttl else None
                    await self._tokens.mint_for_sandbox(who, sandbox_id, expires)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self._tokens.revoke_sandbox(sandbox_id, "its creation failed")
                        await self._pools.release(
                            lease.runtime.id, _ended(sandbox_id, "its creation failed"), "creation failed"
                        )
                    raise
            finally:
                if checked is not None:
                    await anyio.to_thread.run_sync(shutil.rmtree, checked, True)
            row = await self._store.get(Sandbox, sandbox_id)
            assert row is not None
            rec.detail.update(
                network=spec_network,
                cpus=cpus,
                memory_mb=memory_mb,
                runtime=lease.runtime.id,
                served="warm" if lease.warm else "cold",
                claim_ms=round(lease.claim_ms, 2),
            )
        return self._info(row)

    async def destroy(self, who: Identity, sandbox_id: str) -> None:
        """Remove the sandbox's container and volumes; its id is unknown from then on. Another
        user's sandbox needs workspace:admin."""
        row = await self._owned(who, sandbox_id, Action.SANDBOX_DESTROY)
        await self._tokens.may_end(who, row.user_id, Action.SANDBOX_DESTROY, sandbox_id, "sandbox")
        async with self._audit.record(who, Action.SANDBOX_DESTROY, sandbox_id):
            await self._end(row, "destroyed by its owner")

    async def list(self, who: Identity) -> list[SandboxInfo]:
        def query(session: Session) -> list[Sandbox]:
            stmt = (
                select(Sandbox)
                .where(Sandbox.workspace_id == who.workspace_id, Sandbox.status == SandboxStatus.RUNNING)
                .order_by(col(Sandbox.created_at))
            )
            if who.sandbox_id is not None:  # a sandbox's own token sees that sandbox only
                stmt = stmt.where(Sandbox.id == who.sandbox_id)
            return list(session.exec(stmt).all())

        return [self._info(row) for row in await self._store.run(query)]

    def _quota_check(self, who: Identity) -> Callable[[Session], None]:
        """A check that refuses one more sandbox past a concurrent-sandbox quota (tenant,
        workspace, user, and the run's tree: its own and every run it started). Run inside the claim's transaction, the count and the new row
        are one atomic step, so concurrent creates cannot overshoot."""
        quotas = self._settings.quotas
        same_workspace = Sandbox.workspace_id == who.workspace_id
        limits = [
            ("tenant_sandboxes", quotas.tenant_sandboxes, None),
            ("workspace_sandboxes", quotas.workspace_sandboxes, same_workspace),
            ("user_sandboxes", quotas.user_sandboxes, same_workspace & (Sandbox.user_id == who.user_id)),
        ]
        within = running_limits(Sandbox, limits, "sandboxes")
        within_runs = tree_limit(Sandbox, "run_sandboxes", quotas.run_sandboxes, who, "sandboxes")

        def check(session: Session) -> None:
            within(session)
            within_runs(session)

        return check

    async def owner_of_runtime(self, runtime_id: str) -> Identity | None:
        """What a bridge in this runtime acts as: the token of the live sandbox on it, if any."""

        def find(session: Session) -> str | None:
            runtime = session.get(Runtime, runtime_id)
            sandbox = session.get(Sandbox, runtime.sandbox_id) if runtime and runtime.sandbox_id else None
            if sandbox is None or sandbox.status != SandboxStatus.RUNNING or sandbox.runtime_id != runtime_id:
                return None
            return sandbox.id

        sandbox_id = await self._store.run(find)
        return await self._tokens.sandbox_identity(sandbox_id) if sandbox_id else None

    async def unix_user(self, who: Identity, sandbox_id: str) -> str:
        """The sandbox user `who` works as in `sandbox_id`: a team member's own user in its
        team's shared sandbox (assigned by the server when it joined), else the sandbox user."""
        if who.run_id and who.run_id.startswith("mem_"):
            member = await self._store.get(Member, who.run_id)
            if member is not None and member.sandbox_id == sandbox_id and member.unix_user:
                return member.unix_user
        return USER

    async def seat_holder(self, sandbox_id: str, user: str) -> str | None:
        """The team member whose own user in `sandbox_id` is `user`, if any."""

        def find(session: Session) -> str | None:
            row = session.exec(select(Member).where(Member.sandbox_id == sandbox_id, Member.unix_user == user)).first()
            return row.id if row is not None else None

        return await self._store.run(find)

    # -- work inside a sandbox ----------------------------------------------------------

    async def exec(
        self,
        who: Identity,
        sandbox_id: str,
        command: str | builtins.list[str],  # `list` is a method of this class
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: int | None = None,
        stdin: str | None = None,
        on_output: OutputCallback | None = None,
        runner_env: dict[str, str] | None = None,
        run_as: str | None = None,
    ) -> ExecResult:
        """Run a shell command (a string, for bash) or a program (an argv list, no shell) as the
        sandbox user (a member's own user, see `unix_user`); output is capped, the timeout
        enforced. `runner_env` and `run_as` (one of the image's member users, for a dispatch's
        member in a shared sandbox) are dockyard's own, never a caller's."""
        row = await self._owned(who, sandbox_id, Action.SANDBOX_EXEC)
        user = run_as or await self.unix_user(who, sandbox_id)
        timeout = timeout_s or self._limits.exec_default_timeout_s
        if timeout > self._limits.exec_max_timeout_s:
            raise InvalidRequestError(
                f"timeout_s {timeout} is over the cap; allowed: 1..{self._limits.exec_max_timeout_s}"
            )
        workdir = WORKSPACE if cwd is None else f"{WORKSPACE}/{workspace_path(cwd)}".removesuffix("/.")
        argv = ["/bin/bash", "-c", command] if isinstance(command, str) else list(command)
        shown = command[:1000] if isinstance(command, str) else [arg[:1000] for arg in command[:50]]
        as_member = {"user": user} if user != USER else {}
        async with self._audit.record(
            who, Action.SANDBOX_EXEC, sandbox_id, started=True, command=shown, cwd=workdir, **as_member
        ) as rec:
            result = await run_command(
                await self._supervisors.link(row.container_id),
                argv,
                # the template's env is the container's own
                env={**row.env, **_checked_env(env), **(runner_env or {})},
                workdir=workdir,
                stdin=stdin.encode() if stdin is not None else None,
                timeout_s=timeout,
                cap_bytes=self._limits.output_cap_bytes,
                on_output=on_output,
                user=None if user == USER else user,
            )
            rec.detail.update(exit_code=result.exit_code, timed_out=result.timed_out, truncated=result.truncated)
        return result

    async def write_file(self, who: Identity, sandbox_id: str, path: str, content: str, encoding: str) -> FileWritten:
        row = await self._owned(who, sandbox_id, Action.SANDBOX_WRITE_FILE)
        async with self._audit.record(who, Action.SANDBOX_WRITE_FILE, sandbox_id, path=path, encoding=encoding) as rec:
            data = decode_content(content, encoding, self._limits.write_cap_bytes)
            written = await self._files.write(row.container_id, path, data, await self._member_user(who, sandbox_id))
            rec.detail["size"] = written.size
        return written

    async def read_file(
        self, who: Identity, sandbox_id: str, path: str, encoding: str | None, max_bytes: int | None
    ) -> FileContent:
        row = await self._owned(who, sandbox_id, Action.SANDBOX_READ_FILE)
        cap = self._limits.read_cap_bytes
        if max_bytes is not None and max_bytes > cap:
            raise InvalidRequestError(f"max_bytes {max_bytes} is over the read cap; allowed: 1..{cap}")
        async with self._audit.record(who, Action.SANDBOX_READ_FILE, sandbox_id, path=path) as rec:
            content = await self._files.read(
                row.container_id, path, max_bytes or cap, encoding, await self._member_user(who, sandbox_id)
            )
            rec.detail.update(size=content.size, truncated=content.truncated)
        return content

    async def list_files(
        self, who: Identity, sandbox_id: str, path: str, recursive: bool, max_entries: int | None
    ) -> FileListing:
        row = await self._owned(who, sandbox_id, Action.SANDBOX_LIST_FILES)
        limit = min(max_entries or self._limits.list_max_entries, self._limits.list_max_entries)
        async with self._audit.record(who, Action.SANDBOX_LIST_FILES, sandbox_id, path=path, recursive=recursive):
            return await self._files.list(
                row.container_id, path, recursive, limit, await self._member_user(who, sandbox_id)
            )

    async def expose_port(self, who: Identity, sandbox_id: str, port: int) -> PortInfo:
        row = await self._owned(who, sandbox_id, Action.SANDBOX_EXPOSE_PORT)
        async with self._audit.record(who, Action.SANDBOX_EXPOSE_PORT, sandbox_id, port=port) as rec:
            exposed = await self.ports.open(row.container_id, port)
            rec.detail["host_port"] = exposed.host_port  # not the URL: it carries the preview's key
        return PortInfo(sandbox_id=sandbox_id, port=port, url=exposed.url)

    async def snapshot(self, who: Identity, sandbox_id: str, label: str | None) -> SnapshotInfo:
        """Save /workspace and the home directory, consistent: the sandbox is paused meanwhile.

        A workspace's snapshots share one quota (quotas.workspace_snapshot_mb): the copy stops
        when it would pass what is left. One snapshot at a time per workspace, so concurrent ones
        cannot each count the same room."""
        row = await self._owned(who, sandbox_id, Action.SANDBOX_SNAPSHOT)
        snapshot_id = f"snp_{secrets.token_hex(8)}"
        folder = self._settings.snapshots_dir / snapshot_id
        async with self._audit.record(
            who, Action.SANDBOX_SNAPSHOT, sandbox_id, started=True, snapshot_id=snapshot_id, label=label
        ) as rec:
            async with self._snapshot_lock(who.workspace_id):
                room = await self._snapshot_room(who.workspace_id)
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

    async def delete_snapshot(self, who: Identity, snapshot_id: str) -> None:
        """Delete a snapshot of the caller's workspace (another user's needs workspace:admin),
        giving its space back to the workspace's snapshot quota."""
        snap = await self._owned_snapshot(who, snapshot_id)
        await self._tokens.may_end(who, snap.user_id, Action.SNAPSHOT_DELETE, snapshot_id, "snapshot")
        async with self._audit.record(who, Action.SNAPSHOT_DELETE, snapshot_id, size_bytes=snap.size_bytes):

            def forget(session: Session) -> None:
                found = session.get(Snapshot, snapshot_id)
                if found is not None:
                    session.delete(found)

            await self._store.run(forget)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, snap.path, True)

    def _snapshot_lock(self, workspace_id: str) -> anyio.Lock:
        return self._snapshot_locks.setdefault(workspace_id, anyio.Lock())

    async def _snapshot_room(self, workspace_id: str) -> _Room:
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

    # -- housekeeping -------------------------------------------------------------------

    async def reap_expired(self) -> int:
        """Destroy sandboxes past their expiry; returns how many."""

        def expired(session: Session) -> list[Sandbox]:
            stmt = select(Sandbox).where(
                Sandbox.status == SandboxStatus.RUNNING,
                col(Sandbox.expires_at).is_not(None),
                col(Sandbox.expires_at) < utcnow(),
            )
            return list(session.exec(stmt).all())

        rows = await self._store.run(expired)
        for row in rows:
            who = Identity(
                workspace_id=row.workspace_id, project_id=row.project_id, user_id="dockyard", run_id=row.run_id
            )
            async with self._audit.record(who, Action.SANDBOX_EXPIRE, row.id):
                await self._end(row, "its time to live ran out")
        return len(rows)

    # -- internals ----------------------------------------------------------------------

    async def _member_user(self, who: Identity, sandbox_id: str) -> str | None:
        """A member's own user in the sandbox, or None for the sandbox user."""
        user = await self.unix_user(who, sandbox_id)
        return None if user == USER else user

    async def check_owned(
        self,
        who: Identity,
        sandbox_id: str,
        action: Action,
    ) -> None:
        """Raise (and audit) unless the sandbox is the caller's and live."""
        await self._owned(who, sandbox_id, action)

    async def _owned(self, who: Identity, sandbox_id: str, action: Action) -> Sandbox:
        """The caller's live sandbox; a sandbox that is not theirs is unknown to them (and the
        attempt is audited as denied)."""
        row = await self._store.get(Sandbox, sandbox_id)
        if row is None or row.workspace_id != who.workspace_id or who.sandbox_id not in (None, sandbox_id):
            await self._audit.append(
                who,
                action,
                target=sandbox_id,
                outcome="denied",
                detail={"error": "no such sandbox in the caller's reach", "token_id": who.token_id},
            )
            raise SandboxNotFoundError(sandbox_id)
        if row.status == SandboxStatus.LOST:
            await self._tokens.revoke_sandbox(sandbox_id, "its sandbox was lost")
            raise SandboxLostError(sandbox_id, row.end_reason or "its container is gone")
        if row.status != SandboxStatus.RUNNING:
            raise SandboxNotFoundError(sandbox_id)
        if self._docker.paused_outside(row.container_id) and action != Action.SANDBOX_DESTROY:
            raise SandboxPausedError(sandbox_id)
        return row

    async def _owned_snapshot(self, who: Identity, snapshot_id: str) -> Snapshot:
        snap = await self._store.get(Snapshot, snapshot_id)
        if snap is None or snap.workspace_id != who.workspace_id or not await anyio.Path(snap.path).is_dir():
            raise SnapshotNotFoundError(snapshot_id)
        return snap

    async def _end(self, row: Sandbox, reason: str) -> None:
        """Close the sandbox and give its runtime back to the pool (which wipes or destroys it)."""
        self.ports.close(row.container_id)
        await self._tokens.revoke_sandbox(row.id, reason)
        await self._pools.release(row.runtime_id, _ended(row.id, reason), reason)

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

    async def _checked_copy(self, snapshot: Snapshot) -> Path:
        """Copy the snapshot's tars, entry by entry through `copy_checked`, into a folder of the
        data dir that only this restore uses; raises UnsafeSnapshotError for a tampered one."""
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

    async def _restore(self, container_id: str, folder: Path) -> None:
        for name, path in _TARS.items():
            async with await anyio.open_file(folder / name, "rb") as source:
                await self._docker.put_archive(container_id, path, source.wrapped)

    def _template(self, name: str) -> TemplateSettings:
        """A sandbox template; a computer's template is refused, its runtimes have no supervisor."""
        tpl = self._settings.templates.get(name)
        sandboxes = sorted(n for n, t in self._settings.templates.items() if t.kind == "sandbox")
        if tpl is None:
            raise TemplateNotFoundError(name, sandboxes)
        if tpl.kind != "sandbox":
            raise InvalidRequestError(
                f"template '{name}' is a {tpl.kind}; use {tpl.kind}_create (sandbox templates: {', '.join(sandboxes)})"
            )
        return tpl

    def _network(self, mode: str) -> str:
        allowed = ["none", "workspace"] + (["internet"] if self._limits.allow_internet else [])
        if mode not in allowed:
            why = " (disabled by config: sandbox.allow_internet)" if mode == "internet" else ""
            raise NetworkNotAllowedError(f"network '{mode}' is not allowed{why}; allowed: {', '.join(allowed)}")
        return mode

    def _capped(self, name: str, value: float, cap: float) -> float:
        if value > cap:
            raise InvalidRequestError(f"{name} {value} is over the cap; allowed: up to {cap}")
        return value

    def _ttl(self, ttl_s: int | None) -> int:
        ttl = self._limits.default_ttl_s if ttl_s is None else ttl_s
        if ttl > self._limits.max_ttl_s:
            raise InvalidRequestError(f"ttl_s {ttl} is over the cap; allowed: 1..{self._limits.max_ttl_s}")
        return ttl

    def _info(self, row: Sandbox) -> SandboxInfo:
        ports = self.ports.ports(row.container_id)
        return SandboxInfo(
            sandbox_id=row.id,
            template=row.template,
            status=row.status,
            network=row.network,
            cpus=row.cpus,
            memory_mb=row.memory_mb,
            created_at=row.created_at,
            expires_at=row.expires_at,
            from_snapshot=row.from_snapshot,
            ports={port: exposed.url for port, exposed in ports.items()},
        )


def running_limits(model: Any, limits: list[tuple[str, int, Any]], noun: str) -> Callable[[Session], None]:
    """A check that refuses one more running `model` row (a sandbox, a computer) past any of
    `limits`: (quota name, limit or 0 for none, the rows it counts or None for all)."""

    def check(session: Session) -> None:
        for name, limit, where in limits:
            if not limit:
                continue
            stmt = select(func.count()).select_from(model).where(model.status == SandboxStatus.RUNNING)
            held = session.exec(stmt.where(where) if where is not None else stmt).one()
            if held >= limit:
                raise QuotaExceededError(
                    f"quota {name} reached: {held} of {limit} {noun} are running; destroy one "
                    "you no longer need, or ask the operator for a higher quota"
                )

    return check


def _ended(sandbox_id: str, reason: str) -> Bind:
    """A release's owner side: the sandbox row is closed in the same transaction."""

    def close(session: Session, _runtime: Runtime) -> None:
        sandbox = session.get(Sandbox, sandbox_id)
        if sandbox is not None and sandbox.status == SandboxStatus.RUNNING:
            sandbox.status, sandbox.ended_at, sandbox.end_reason = SandboxStatus.DESTROYED, utcnow(), reason
            session.add(sandbox)

    return close


def _checked_env(env: dict[str, str] | None) -> dict[str, str]:
    for name in env or {}:
        if not _ENV_NAME.match(name) or name.startswith("DOCKYARD_"):
            raise InvalidRequestError(
                f"invalid environment variable name '{name}'; use letters, digits and '_' (not starting "
                "with a digit), and not the reserved DOCKYARD_ prefix"
            )
    return dict(env or {})


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
