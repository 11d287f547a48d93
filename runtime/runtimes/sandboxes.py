"""Sandboxes: a workspace's claim of a pooled runtime, from sandbox_create to its end, and
the work done in it (commands, files, ports).

Whose a sandbox is lives in `sandboxaccess.py`, snapshots in `snapshots.py`, the
concurrent-sandbox quotas in `quotas.py`.
"""

from __future__ import annotations

import builtins
import logging
import secrets
import shutil
from collections.abc import Awaitable, Callable
from datetime import timedelta

import anyio
from sqlmodel import Session, col, select

from dockyard.runtime.runtimes.commands import OutputCallback, run_command
from dockyard.runtime.runtimes.files import WORKSPACE, FileOps, decode_content, fit_listing, workspace_path
from dockyard.runtime.runtimes.images import BuildState
from dockyard.runtime.runtimes.outputs import ExecOutputs, Stream, fit_exec
from dockyard.runtime.runtimes.pool import Bind, PoolManager
from dockyard.runtime.runtimes.ports import PortForwarder
from dockyard.runtime.runtimes.provision import USER
from dockyard.runtime.runtimes.quotas import sandbox_quota
from dockyard.runtime.runtimes.sandboxaccess import SandboxAccess
from dockyard.runtime.runtimes.sandboxspec import capped, checked_env, sandbox_template, ttl_within, usable_network
from dockyard.runtime.runtimes.snapshots import SnapshotService
from dockyard.runtime.runtimes.supervisor import Supervisors
from dockyard.runtime.substrate.actions import Action
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.docker import DockerBackend
from dockyard.runtime.substrate.errors import InvalidRequestError, NotFoundError, SandboxNotFoundError
from dockyard.runtime.substrate.models import (
    ExecResult,
    FileContent,
    FileListing,
    FileReadResult,
    FileWritten,
    PortInfo,
    SandboxInfo,
)
from dockyard.runtime.substrate.settings import Identity, NetworkMode, Settings
from dockyard.runtime.substrate.store import Runtime, Sandbox, SandboxStatus, Store, utcnow
from dockyard.runtime.substrate.tokens import TokenService

__all__ = ["SandboxService"]

log = logging.getLogger(__name__)

BuildNotify = Callable[[BuildState], Awaitable[None]]


class SandboxService:
    """Creates, runs commands in, reads and writes files of, and destroys sandboxes; audits
    every action."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        audit: AuditLog,
        docker: DockerBackend,
        pools: PoolManager,
        supervisors: Supervisors,
        tokens: TokenService,
        access: SandboxAccess,
        snapshots: SnapshotService,
    ) -> None:
        self._settings = settings
        self._limits = settings.sandbox
        self._store = store
        self._audit = audit
        self._pools = pools
        self._supervisors = supervisors
        self._tokens = tokens
        self._access = access
        self._snapshots = snapshots
        self._files = FileOps(supervisors)
        self.ports = PortForwarder(docker, USER)
        self._outputs = ExecOutputs(self._limits.exec_outputs_kept)
        # Told the id and workspace of a sandbox whose status changed: created, destroyed,
        # expired or lost (the server wakes that workspace's subscribers with it).
        self.on_change: Callable[[str, str], Awaitable[None]] | None = None
        pools.on_sandbox_lost = self._tell

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
            snapshot = await self._snapshots.owned(who, from_snapshot) if from_snapshot else None
            name = template or (snapshot.template if snapshot else self._limits.default_template)
            rec.detail["template"] = name
            tpl = sandbox_template(self._settings, name)
            spec_network = usable_network(self._limits, network or tpl.network)
            cpus = capped("cpus", cpus or tpl.cpus, self._limits.max_cpus)
            memory_mb = int(capped("memory_mb", memory_mb or tpl.memory_mb, self._limits.max_memory_mb))
            ttl = ttl_within(self._limits, ttl_s)
            env = checked_env(env)
            sandbox_id = f"sbx_{secrets.token_hex(8)}"
            rec.target = sandbox_id

            within_quotas = sandbox_quota(self._settings.quotas, who)
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
            checked = await self._snapshots.checked_copy(snapshot) if snapshot is not None else None
            try:
                lease = await self._pools.claim(name, who.workspace_id, bind, network=spec_network, notify=notify)
                try:
                    if (cpus, memory_mb) != (lease.runtime.cpus, lease.runtime.memory_mb):
                        await self._pools.resize(lease.runtime.id, cpus, memory_mb)
                    if checked is not None:
                        await self._snapshots.restore(lease.runtime.container_id or "", checked)
                    expires = utcnow() + timedelta(seconds=ttl) if ttl else None
                    await self._tokens.mint_for_sandbox(who, sandbox_id, expires)
                    row = await self._store.get(Sandbox, sandbox_id)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self._tokens.revoke_sandbox(sandbox_id, "its creation failed")
                        await self._pools.release(
                            lease.runtime.id, _ended(sandbox_id, "its creation failed"), "creation failed"
                        )
                    raise
            finally:
                if checked is not None:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(shutil.rmtree, checked, True)
            assert row is not None
            rec.detail.update(
                network=spec_network,
                cpus=cpus,
                memory_mb=memory_mb,
                runtime=lease.runtime.id,
                served="warm" if lease.warm else "cold",
                claim_ms=round(lease.claim_ms, 2),
            )
        await self._tell(sandbox_id, who.workspace_id)
        return self._info(row)

    async def destroy(self, who: Identity, sandbox_id: str) -> None:
        """Remove the sandbox's container and volumes; its id is unknown from then on. Another
        user's sandbox needs workspace:admin."""
        row = await self._access.owned(who, sandbox_id, Action.SANDBOX_DESTROY)
        await self._tokens.may_end(who, row.user_id, Action.SANDBOX_DESTROY, sandbox_id, "sandbox")
        async with self._audit.record(who, Action.SANDBOX_DESTROY, sandbox_id):
            await self._end(row, "destroyed by its owner")

    async def get(self, who: Identity, sandbox_id: str) -> SandboxInfo:
        """One sandbox of the caller's reach in whatever state it is (running, destroyed, lost);
        another workspace's is as unknown as one that never was."""
        row = await self._store.get(Sandbox, sandbox_id)
        if row is None or row.workspace_id != who.workspace_id or who.sandbox_id not in (None, sandbox_id):
            raise SandboxNotFoundError(sandbox_id)
        return self._info(row)

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

    # -- whose it is ----------------------------------------------------------------------

    async def check_owned(self, who: Identity, sandbox_id: str, action: Action) -> None:
        """Raise (and audit) unless the sandbox is the caller's and live."""
        await self._access.owned(who, sandbox_id, action)

    async def unix_user(self, who: Identity, sandbox_id: str) -> str:
        """The sandbox user `who` works as in `sandbox_id` (see `SandboxAccess.unix_user`)."""
        return await self._access.unix_user(who, sandbox_id)

    async def seat_holder(self, sandbox_id: str, user: str) -> str | None:
        """The team member whose own user in `sandbox_id` is `user`, if any."""
        return await self._access.seat_holder(sandbox_id, user)

    async def owner_of_runtime(self, runtime_id: str) -> Identity | None:
        """What a bridge in this runtime acts as: the token of the live sandbox on it, if any."""
        return await self._access.owner_of_runtime(runtime_id)

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
        fit: bool = False,
    ) -> ExecResult:
        """Run a shell command (a string, for bash) or a program (an argv list, no shell) as the
        sandbox user (a member's own user, see `unix_user`); output is capped, the timeout
        enforced. `runner_env` and `run_as` (one of the image's member users, for a dispatch's
        member in a shared sandbox) are dockyard's own, never a caller's. With `fit` the full
        output is kept (see `read_output`) and the result's streams are cut to fit the result budget."""
        row = await self._access.owned(who, sandbox_id, Action.SANDBOX_EXEC)
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
                env={**row.env, **checked_env(env), **(runner_env or {})},
                workdir=workdir,
                stdin=stdin.encode() if stdin is not None else None,
                timeout_s=timeout,
                cap_bytes=self._limits.output_cap_bytes,
                scan_bytes=self._limits.output_scan_bytes,
                on_output=on_output,
                user=None if user == USER else user,
            )
            rec.detail.update(exit_code=result.exit_code, timed_out=result.timed_out, truncated=result.truncated)
        if not fit:
            return result
        n = self._outputs.keep(sandbox_id, result.stdout, result.stderr)
        return fit_exec(result, self._settings.results.budget_chars, sandbox_id, n)

    async def read_output(self, who: Identity, sandbox_id: str, n: int, stream: Stream) -> str:
        """All of one kept command output's stream (as far as the output cap kept it)."""
        await self._access.owned(who, sandbox_id, Action.SANDBOX_READ_OUTPUT)
        async with self._audit.record(who, Action.SANDBOX_READ_OUTPUT, sandbox_id, n=n, stream=stream):
            text = self._outputs.get(sandbox_id, n, stream)
            if text is None:
                raise NotFoundError(
                    f"sandbox {sandbox_id} keeps no output {n}: outputs are numbered from 1 per sandbox and only "
                    f"the newest {self._limits.exec_outputs_kept} are kept"
                )
        return text

    async def write_file(self, who: Identity, sandbox_id: str, path: str, content: str, encoding: str) -> FileWritten:
        row = await self._access.owned(who, sandbox_id, Action.SANDBOX_WRITE_FILE)
        async with self._audit.record(who, Action.SANDBOX_WRITE_FILE, sandbox_id, path=path, encoding=encoding) as rec:
            data = decode_content(content, encoding, self._limits.write_cap_bytes)
            written = await self._files.write(
                row.container_id, path, data, await self._access.member_user(who, sandbox_id)
            )
            rec.detail["size"] = written.size
        return written

    async def read_file(
        self, who: Identity, sandbox_id: str, path: str, encoding: str | None, max_bytes: int | None
    ) -> FileContent:
        row = await self._access.owned(who, sandbox_id, Action.SANDBOX_READ_FILE)
        cap = self._limits.read_cap_bytes
        if max_bytes is not None and max_bytes > cap:
            raise InvalidRequestError(f"max_bytes {max_bytes} is over the read cap; allowed: 1..{cap}")
        async with self._audit.record(who, Action.SANDBOX_READ_FILE, sandbox_id, path=path) as rec:
            content = await self._files.read(
                row.container_id, path, max_bytes or cap, encoding, await self._access.member_user(who, sandbox_id)
            )
            rec.detail.update(size=content.size, truncated=content.truncated)
        return content

    async def read_page(
        self, who: Identity, sandbox_id: str, path: str, encoding: str | None, offset: int, length: int | None
    ) -> tuple[FileReadResult, bytes]:
        """A page of a file, within the result budget (see `FileOps.read_page`); returns it and its bytes."""
        row = await self._access.owned(who, sandbox_id, Action.SANDBOX_READ_FILE)
        cap = self._limits.read_cap_bytes
        if length is not None and length > cap:
            raise InvalidRequestError(f"length {length} is over the read cap; allowed: 1..{cap}")
        budget = self._settings.results.budget_chars
        async with self._audit.record(who, Action.SANDBOX_READ_FILE, sandbox_id, path=path, offset=offset) as rec:
            page, data = await self._files.read_page(
                row.container_id,
                path,
                offset,
                length or min(budget, cap),
                encoding,
                budget,
                await self._access.member_user(who, sandbox_id),
            )
            rec.detail.update(size=page.size, length=page.length)
        return page, data

    async def list_files(
        self, who: Identity, sandbox_id: str, path: str, recursive: bool, max_entries: int | None
    ) -> FileListing:
        row = await self._access.owned(who, sandbox_id, Action.SANDBOX_LIST_FILES)
        limit = min(max_entries or self._limits.list_max_entries, self._limits.list_max_entries)
        async with self._audit.record(who, Action.SANDBOX_LIST_FILES, sandbox_id, path=path, recursive=recursive):
            listing = await self._files.list(
                row.container_id, path, recursive, limit, await self._access.member_user(who, sandbox_id)
            )
        return fit_listing(listing, self._settings.results.budget_chars)

    async def expose_port(self, who: Identity, sandbox_id: str, port: int) -> PortInfo:
        row = await self._access.owned(who, sandbox_id, Action.SANDBOX_EXPOSE_PORT)
        async with self._audit.record(who, Action.SANDBOX_EXPOSE_PORT, sandbox_id, port=port) as rec:
            exposed = await self.ports.open(row.container_id, port)
            rec.detail["host_port"] = exposed.host_port  # not the URL: it carries the preview's key
        return PortInfo(sandbox_id=sandbox_id, port=port, url=exposed.url)

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

    async def _end(self, row: Sandbox, reason: str) -> None:
        """Close the sandbox and give its runtime back to the pool (which wipes or destroys it)."""
        self.ports.close(row.container_id)
        self._outputs.forget(row.id)
        await self._tokens.revoke_sandbox(row.id, reason)
        await self._pools.release(row.runtime_id, _ended(row.id, reason), reason)
        await self._tell(row.id, row.workspace_id)

    async def _tell(self, sandbox_id: str, workspace_id: str) -> None:
        # Shielded: a cancel landing here, after a create has its runtime, would leave the
        # sandbox to nobody (the caller never learns its id); it lands at the caller's next step.
        if self.on_change is not None:
            with anyio.CancelScope(shield=True):
                try:
                    await self.on_change(sandbox_id, workspace_id)
                except Exception:  # a subscriber's trouble must not stop the sandbox's lifecycle
                    log.exception("sandbox %s: change notification failed", sandbox_id)

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


def _ended(sandbox_id: str, reason: str) -> Bind:
    """A release's owner side: the sandbox row is closed in the same transaction."""

    def close(session: Session, _runtime: Runtime) -> None:
        sandbox = session.get(Sandbox, sandbox_id)
        if sandbox is not None and sandbox.status == SandboxStatus.RUNNING:
            sandbox.status, sandbox.ended_at, sandbox.end_reason = SandboxStatus.DESTROYED, utcnow(), reason
            session.add(sandbox)

    return close
