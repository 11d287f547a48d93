"""Sandboxes: hardened containers with a persistent /workspace, owned by one workspace."""

from __future__ import annotations

import re
import secrets
import shutil
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import anyio
from sqlmodel import Session, col, select

from dockyard.runtime.audit import AuditLog
from dockyard.runtime.commands import OutputCallback, run_command
from dockyard.runtime.docker import ContainerSpec, DockerBackend
from dockyard.runtime.errors import (
    InvalidRequestError,
    NetworkNotAllowedError,
    SandboxNotFoundError,
    SnapshotNotFoundError,
    TemplateNotFoundError,
)
from dockyard.runtime.files import WORKSPACE, FileOps, decode_content, workspace_path
from dockyard.runtime.images import BuildState, ImageService
from dockyard.runtime.models import (
    ExecResult,
    FileContent,
    FileListing,
    FileWritten,
    PortInfo,
    SandboxInfo,
    SnapshotInfo,
)
from dockyard.runtime.ports import PortForwarder
from dockyard.runtime.settings import Identity, NetworkMode, Settings, TemplateSettings
from dockyard.runtime.store import Runtime, RuntimeStatus, Snapshot, Store, utcnow

__all__ = ["SandboxService"]

USER = "agent"
HOME = "/home/agent"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
BuildNotify = Callable[[BuildState], Awaitable[None]]


class SandboxService:
    """Creates, runs commands in, snapshots and destroys sandboxes; audits every action."""

    def __init__(
        self, settings: Settings, instance: str, store: Store, audit: AuditLog, docker: DockerBackend, images: ImageService
    ) -> None:
        self._settings = settings
        self._limits = settings.sandbox
        self._instance = instance
        self._store = store
        self._audit = audit
        self._docker = docker
        self._images = images
        self._files = FileOps(docker)
        self.ports = PortForwarder(docker, USER)

    @property
    def labels(self) -> dict[str, str]:
        """The labels that mark a container or network as this instance's."""
        return {"dockyard.managed": "true", "dockyard.instance": self._instance}

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
        async with self._audit.record(who, "sandbox.create", template=template, from_snapshot=from_snapshot) as rec:
            snapshot = await self._owned_snapshot(who, from_snapshot) if from_snapshot else None
            name = template or (snapshot.template if snapshot else self._limits.default_template)
            rec.detail["template"] = name
            tpl = self._template(name)
            spec_network = self._network(network or tpl.network)
            cpus = self._capped("cpus", cpus or tpl.cpus, self._limits.max_cpus)
            memory_mb = int(self._capped("memory_mb", memory_mb or tpl.memory_mb, self._limits.max_memory_mb))
            ttl = self._ttl(ttl_s)
            image = await self._images.wait_ready(tpl.image, self._settings.images.wait_s, notify)
            sandbox_id = f"sbx_{secrets.token_hex(8)}"
            rec.target = sandbox_id
            spec = self._spec(who, sandbox_id, tpl, image, spec_network, cpus, memory_mb, _checked_env(env))
            if spec_network == "workspace":
                ws_labels = {**self.labels, "dockyard.workspace": who.workspace_id}
                await self._docker.ensure_network(spec.network, ws_labels, internal=True)
            container_id = await self._docker.run_container(spec)
            try:
                if snapshot is not None:
                    await self._restore(container_id, Path(snapshot.path))
                row = Runtime(
                    id=sandbox_id,
                    template=name,
                    image=image,
                    container_id=container_id,
                    container_name=spec.name,
                    status=RuntimeStatus.RUNNING,
                    network=spec_network,
                    cpus=cpus,
                    memory_mb=memory_mb,
                    workspace_id=who.workspace_id,
                    project_id=who.project_id,
                    user_id=who.user_id,
                    run_id=who.run_id,
                    from_snapshot=from_snapshot,
                    expires_at=utcnow() + timedelta(seconds=ttl) if ttl else None,
                )
                await self._store.add(row)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._docker.remove_container(container_id)
                raise
            rec.detail.update(network=row.network, cpus=cpus, memory_mb=memory_mb, container=container_id[:12])
        return self._info(row)

    async def destroy(self, who: Identity, sandbox_id: str) -> None:
        """Remove the sandbox's container and volumes; its id is unknown from then on."""
        row = await self._owned(who, sandbox_id)
        async with self._audit.record(who, "sandbox.destroy", sandbox_id):
            await self._remove(row, RuntimeStatus.DESTROYED)

    async def list(self, who: Identity) -> list[SandboxInfo]:
        def query(session: Session) -> list[Runtime]:
            stmt = (
                select(Runtime)
                .where(Runtime.workspace_id == who.workspace_id, Runtime.status == RuntimeStatus.RUNNING)
                .order_by(col(Runtime.created_at))
            )
            return list(session.exec(stmt).all())

        return [self._info(row) for row in await self._store.run(query)]

    # -- work inside a sandbox ----------------------------------------------------------

    async def exec(
        self,
        who: Identity,
        sandbox_id: str,
        command: str,
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: int | None = None,
        stdin: str | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        """Run a shell command as the sandbox user; output is capped, the timeout enforced."""
        row = await self._owned(who, sandbox_id)
        timeout = timeout_s or self._limits.exec_default_timeout_s
        if timeout > self._limits.exec_max_timeout_s:
            raise InvalidRequestError(f"timeout_s {timeout} is over the cap; allowed: 1..{self._limits.exec_max_timeout_s}")
        workdir = WORKSPACE if cwd is None else f"{WORKSPACE}/{workspace_path(cwd)}".removesuffix("/.")
        async with self._audit.record(who, "sandbox.exec", sandbox_id, command=command[:1000], cwd=workdir) as rec:
            result = await run_command(
                self._docker,
                _container(row),
                ["/bin/bash", "-c", command],
                user=USER,
                env={**self._template(row.template).env, **_checked_env(env)},
                workdir=workdir,
                stdin=stdin.encode() if stdin is not None else None,
                timeout_s=timeout,
                cap_bytes=self._limits.output_cap_bytes,
                on_output=on_output,
            )
            rec.detail.update(exit_code=result.exit_code, timed_out=result.timed_out, truncated=result.truncated)
        return result

    async def write_file(self, who: Identity, sandbox_id: str, path: str, content: str, encoding: str) -> FileWritten:
        row = await self._owned(who, sandbox_id)
        async with self._audit.record(who, "sandbox.write_file", sandbox_id, path=path, encoding=encoding) as rec:
            data = decode_content(content, encoding, self._limits.write_cap_bytes)
            written = await self._files.write(_container(row), path, data)
            rec.detail["size"] = written.size
        return written

    async def read_file(
        self, who: Identity, sandbox_id: str, path: str, encoding: str | None, max_bytes: int | None
    ) -> FileContent:
        row = await self._owned(who, sandbox_id)
        cap = self._limits.read_cap_bytes
        if max_bytes is not None and max_bytes > cap:
            raise InvalidRequestError(f"max_bytes {max_bytes} is over the read cap; allowed: 1..{cap}")
        async with self._audit.record(who, "sandbox.read_file", sandbox_id, path=path) as rec:
            content = await self._files.read(_container(row), path, max_bytes or cap, encoding)
            rec.detail.update(size=content.size, truncated=content.truncated)
        return content

    async def list_files(
        self, who: Identity, sandbox_id: str, path: str, recursive: bool, max_entries: int | None
    ) -> FileListing:
        row = await self._owned(who, sandbox_id)
        limit = min(max_entries or self._limits.list_max_entries, self._limits.list_max_entries)
        async with self._audit.record(who, "sandbox.list_files", sandbox_id, path=path, recursive=recursive):
            return await self._files.list(_container(row), path, recursive, limit)

    async def expose_port(self, who: Identity, sandbox_id: str, port: int) -> PortInfo:
        row = await self._owned(who, sandbox_id)
        async with self._audit.record(who, "sandbox.expose_port", sandbox_id, port=port) as rec:
            host_port = await self.ports.open(_container(row), port)
            url = f"http://127.0.0.1:{host_port}/"
            rec.detail["url"] = url
        return PortInfo(sandbox_id=sandbox_id, port=port, url=url)

    async def snapshot(self, who: Identity, sandbox_id: str, label: str | None) -> SnapshotInfo:
        """Save /workspace and the home directory, consistent: the sandbox is paused meanwhile."""
        row = await self._owned(who, sandbox_id)
        snapshot_id = f"snp_{secrets.token_hex(8)}"
        folder = self._settings.snapshots_dir / snapshot_id
        async with self._audit.record(who, "sandbox.snapshot", sandbox_id, snapshot_id=snapshot_id, label=label) as rec:
            try:
                size = await self._archive(_container(row), folder)
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

    # -- housekeeping -------------------------------------------------------------------

    async def reconcile(self) -> None:
        """At start: adopt this instance's live containers, remove the rest, mark lost rows."""
        containers = await self._docker.list_containers(self.labels)

        def live_rows(session: Session) -> dict[str, Runtime]:
            stmt = select(Runtime).where(col(Runtime.status).in_([RuntimeStatus.RUNNING, RuntimeStatus.STARTING]))
            return {row.id: row for row in session.exec(stmt).all()}

        rows = await self._store.run(live_rows)
        adopted: set[str] = set()
        for container in containers:
            row = rows.get(container["Labels"].get("dockyard.runtime", ""))
            if row is None or row.status != RuntimeStatus.RUNNING or row.container_id != container["Id"]:
                await self._docker.remove_container(container["Id"])
                continue
            if container["State"] != "running":
                try:
                    await self._docker.start_container(container["Id"])
                except Exception:
                    await self._docker.remove_container(container["Id"])
                    continue
            adopted.add(row.id)
        lost = [row.id for row in rows.values() if row.id not in adopted]
        if lost:
            await self._mark(lost, RuntimeStatus.LOST)
        for network in await self._docker.list_networks(self.labels):
            await self._docker.remove_network_if_unused(network["Name"])

    async def reap_expired(self) -> int:
        """Destroy sandboxes past their expiry; returns how many."""

        def expired(session: Session) -> list[Runtime]:
            stmt = select(Runtime).where(
                Runtime.status == RuntimeStatus.RUNNING, col(Runtime.expires_at).is_not(None), col(Runtime.expires_at) < utcnow()
            )
            return list(session.exec(stmt).all())

        rows = await self._store.run(expired)
        for row in rows:
            who = Identity(workspace_id=row.workspace_id, project_id=row.project_id, user_id="dockyard", run_id=row.run_id)
            async with self._audit.record(who, "sandbox.expire", row.id):
                await self._remove(row, RuntimeStatus.DESTROYED)
        return len(rows)

    # -- internals ----------------------------------------------------------------------

    async def _owned(self, who: Identity, sandbox_id: str) -> Runtime:
        row = await self._store.get(Runtime, sandbox_id)
        if row is None or row.status != RuntimeStatus.RUNNING or row.workspace_id != who.workspace_id:
            raise SandboxNotFoundError(sandbox_id)
        return row

    async def _owned_snapshot(self, who: Identity, snapshot_id: str) -> Snapshot:
        snap = await self._store.get(Snapshot, snapshot_id)
        if snap is None or snap.workspace_id != who.workspace_id or not Path(snap.path).is_dir():
            raise SnapshotNotFoundError(snapshot_id)
        return snap

    async def _remove(self, row: Runtime, status: str) -> None:
        if row.container_id:
            self.ports.close(row.container_id)
            await self._docker.remove_container(row.container_id)
        await self._mark([row.id], status)
        if row.network == "workspace":
            await self._docker.remove_network_if_unused(self._workspace_network(row.workspace_id))

    async def _mark(self, ids: list[str], status: str) -> None:
        def mark(session: Session) -> None:
            for row in session.exec(select(Runtime).where(col(Runtime.id).in_(ids))).all():
                row.status, row.ended_at = status, utcnow()
                session.add(row)

        await self._store.run(mark)

    async def _archive(self, container_id: str, folder: Path) -> int:
        folder.mkdir(parents=True, exist_ok=True)
        await self._docker.pause(container_id)
        try:
            size = 0
            for name, path in (("workspace.tar", WORKSPACE), ("home.tar", HOME)):
                with open(folder / name, "wb") as sink:
                    size += await self._docker.get_archive_to(container_id, f"{path}/.", sink)
            return size
        finally:
            with anyio.CancelScope(shield=True):
                await self._docker.unpause(container_id)

    async def _restore(self, container_id: str, folder: Path) -> None:
        for name, path in (("workspace.tar", WORKSPACE), ("home.tar", HOME)):
            with open(folder / name, "rb") as source:
                await self._docker.put_archive(container_id, path, source)

    def _template(self, name: str) -> TemplateSettings:
        tpl = self._settings.templates.get(name)
        if tpl is None:
            raise TemplateNotFoundError(name, list(self._settings.templates))
        return tpl

    def _network(self, mode: str) -> str:
        allowed = ["none", "workspace"] + (["internet"] if self._limits.allow_internet else [])
        if mode not in allowed:
            why = " (disabled by config: sandbox.allow_internet)" if mode == "internet" else ""
            raise NetworkNotAllowedError(f"network '{mode}' is not allowed{why}; allowed: {', '.join(allowed)}")
        return mode

    def _workspace_network(self, workspace_id: str) -> str:
        return f"dockyard-{self._instance}-ws-{workspace_id}"

    def _capped(self, name: str, value: float, cap: float) -> float:
        if value > cap:
            raise InvalidRequestError(f"{name} {value} is over the cap; allowed: up to {cap}")
        return value

    def _ttl(self, ttl_s: int | None) -> int:
        ttl = self._limits.default_ttl_s if ttl_s is None else ttl_s
        if ttl > self._limits.max_ttl_s:
            raise InvalidRequestError(f"ttl_s {ttl} is over the cap; allowed: 1..{self._limits.max_ttl_s}")
        return ttl

    def _spec(
        self,
        who: Identity,
        sandbox_id: str,
        tpl: TemplateSettings,
        image: str,
        network: str,
        cpus: float,
        memory_mb: int,
        env: dict[str, str],
    ) -> ContainerSpec:
        docker_network = {"none": "none", "internet": "bridge"}.get(network) or self._workspace_network(who.workspace_id)
        return ContainerSpec(
            image=image,
            name=f"dockyard-{self._instance}-{sandbox_id}",
            labels={
                **self.labels,
                "dockyard.runtime": sandbox_id,
                "dockyard.kind": "sandbox",
                "dockyard.workspace": who.workspace_id,
                "dockyard.project": who.project_id,
                "dockyard.user": who.user_id,
            },
            user=USER,
            command=["sleep", "infinity"],
            network=docker_network,
            cpus=cpus,
            memory_mb=memory_mb,
            pids_limit=tpl.pids_limit,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={tpl.tmp_size_mb}m,mode=1777"},
            env={**tpl.env, **env},
        )

    def _info(self, row: Runtime) -> SandboxInfo:
        ports = self.ports.ports(row.container_id or "")
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
            ports={port: f"http://127.0.0.1:{host}/" for port, host in ports.items()},
        )


def _container(row: Runtime) -> str:
    if row.container_id is None:
        raise SandboxNotFoundError(row.id)
    return row.container_id


def _checked_env(env: dict[str, str] | None) -> dict[str, str]:
    for name in env or {}:
        if not _ENV_NAME.match(name) or name.startswith("DOCKYARD_"):
            raise InvalidRequestError(
                f"invalid environment variable name '{name}'; use letters, digits and '_' (not starting "
                "with a digit), and not the reserved DOCKYARD_ prefix"
            )
    return dict(env or {})
