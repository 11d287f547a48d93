"""The engine: everything the tools act on, opened and closed as one unit."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from dockyard.runtime.runtimes.browsers import PlaywrightBrowsers
from dockyard.runtime.runtimes.computers import ComputerService
from dockyard.runtime.runtimes.images import ImageService
from dockyard.runtime.runtimes.pages import PageService
from dockyard.runtime.runtimes.pool import PoolManager
from dockyard.runtime.runtimes.poolstatus import pool_status
from dockyard.runtime.runtimes.provision import Provisioner
from dockyard.runtime.runtimes.sandboxaccess import SandboxAccess
from dockyard.runtime.runtimes.sandboxes import SandboxService
from dockyard.runtime.runtimes.snapshots import SnapshotService
from dockyard.runtime.runtimes.supervisor import Supervisors
from dockyard.runtime.runtimes.upkeep import PoolUpkeep
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.auditpages import AuditPages
from dockyard.runtime.substrate.docker import DockerBackend
from dockyard.runtime.substrate.errors import BackendError, DockyardError
from dockyard.runtime.substrate.models import PoolInfo
from dockyard.runtime.substrate.settings import Identity, Settings
from dockyard.runtime.substrate.store import Store
from dockyard.runtime.substrate.tokens import TokenService
from dockyard.runtime.work.calltasks import CallTaskService
from dockyard.runtime.work.capabilities import Capabilities, capabilities
from dockyard.runtime.work.dispatch import DispatchService
from dockyard.runtime.work.runners import Runners
from dockyard.runtime.work.teams import TeamService

__all__ = ["Engine", "instance_id"]

log = logging.getLogger(__name__)


def instance_id(settings: Settings) -> str:
    """This data dir's dockyard instance id (created on first use); it labels our containers."""
    path = settings.data_dir / "instance-id"
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(5) + "\n")
    return path.read_text().strip()


@dataclass
class Engine:
    """The store, Docker backend, images and services of one dockyard instance."""

    settings: Settings
    instance: str
    store: Store
    audit: AuditLog
    audit_pages: AuditPages
    docker: DockerBackend
    images: ImageService
    provisioner: Provisioner
    pools: PoolManager
    sandboxes: SandboxService
    snapshots: SnapshotService
    supervisors: Supervisors
    tokens: TokenService
    runners: Runners
    dispatches: DispatchService
    calltasks: CallTaskService
    teams: TeamService
    computers: ComputerService
    pages: PageService

    @property
    def operator(self) -> Identity:
        """The identity of the local (stdio) operator."""
        return self.settings.operator

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Engine]:
        """Open the store, reconcile containers, start background work; close it all on exit.

        Start-up never waits for Docker or an image build: a client's handshake is answered
        at once, and tools that need an image wait for it (or say the build is under way).
        """
        instance = instance_id(settings)
        store = Store(settings.store_path)
        await store.open()
        docker = DockerBackend(settings.docker_host, settings.docker_timeout_s)
        images = ImageService(settings.images, docker, settings.data_dir / "build")
        audit = AuditLog(store, settings.data_dir)
        await audit.recover()  # what a crash cut short is marked interrupted before anything runs
        tokens = TokenService(store, audit, settings.admin_key.get_secret_value() if settings.admin_key else None)
        supervisors = Supervisors(settings.data_dir / "control", docker)
        provisioner = Provisioner(settings, instance, docker, images, supervisors)
        pools = PoolManager(settings, store, provisioner)
        access = SandboxAccess(store, audit, docker, tokens)
        snapshots = SnapshotService(settings, store, audit, docker, tokens, access)
        sandboxes = SandboxService(settings, store, audit, docker, pools, supervisors, tokens, access, snapshots)
        browsers = PlaywrightBrowsers(settings.computers, store, provisioner, sandboxes.ports)
        computers = ComputerService(settings, store, audit, pools, browsers, tokens)
        runners = Runners(sandboxes, settings.sandbox.output_cap_bytes)
        engine = cls(
            settings=settings,
            instance=instance,
            store=store,
            audit=audit,
            audit_pages=AuditPages(audit, settings.results.budget_chars),
            docker=docker,
            images=images,
            provisioner=provisioner,
            pools=pools,
            sandboxes=sandboxes,
            snapshots=snapshots,
            supervisors=supervisors,
            tokens=tokens,
            runners=runners,
            dispatches=DispatchService(settings, store, audit, sandboxes, tokens, runners),
            calltasks=CallTaskService(store),
            teams=TeamService(settings, store, audit, sandboxes, tokens, runners),
            computers=computers,
            pages=PageService(settings, audit, computers, browsers, sandboxes),
        )
        await snapshots.sweep_partial_snapshots()
        try:
            async with anyio.create_task_group() as tg:
                images.attach(tg)
                await tg.start(supervisors.run)
                engine.sandboxes.ports.attach(tg)
                await tg.start(pools.run)
                upkeep = PoolUpkeep(settings.pool, store, pools, provisioner, docker)
                await engine._reconcile(upkeep)
                tg.start_soon(engine._build_images)
                for pool in pools.pools:
                    await pools.replenish(pool)
                tg.start_soon(upkeep.run)
                await tg.start(engine.dispatches.run)
                await tg.start(engine.calltasks.run)
                await tg.start(engine.teams.run)
                await tg.start(browsers.run)
                tg.start_soon(engine._reap_loop)
                try:
                    yield engine
                finally:
                    with anyio.CancelScope(shield=True):
                        await engine._stop_warm()
                    tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await provisioner.guard.close(networks_left=await _networks_left(docker, provisioner))
                await docker.close()
                await store.close()

    async def capabilities(self, who: Identity) -> Capabilities:
        """What this server offers `who` (as its scopes let it see) and its use of each quota."""
        return await capabilities(self.settings, self.store, who)

    async def pool_status(self) -> list[PoolInfo]:
        """Every pool's shape, state counts, queue and claim figures."""
        return await pool_status(self.store, self.settings)

    async def _reconcile(self, upkeep: PoolUpkeep) -> None:
        # Bounded: a daemon that hangs must not hold up the client's handshake.
        with anyio.move_on_after(15):
            try:
                await upkeep.reconcile()
                for network in await self.docker.list_networks(self.provisioner.labels):
                    await self.docker.remove_network_if_unused(network["Name"])
                if await self.docker.list_networks(self.provisioner.labels):
                    # sandboxes adopted on their networks are guarded again at once (the
                    # rules may be gone after a reboot or a firewall reload)
                    await self.provisioner.guard.ensure("workspace")
            except DockyardError as exc:
                log.warning("start-up reconciliation skipped: %s", exc)

    async def _build_images(self) -> None:
        # Only the images of pools kept warm (min > 0) are built at start: they are needed at
        # once. The rest (such as the computer's 1.2 GB browser image under a pool of min 0)
        # are built on first use, which waits for the build with progress like any claim.
        if self.settings.images.build_on_start:
            for image in {t.image for t in self.settings.templates.values() if t.pool.min > 0}:
                self.images.start(image)

    async def _reap_loop(self) -> None:
        # The first sweep runs at start: what expired while no server ran goes at once.
        while True:
            try:
                await self.sandboxes.reap_expired()
                await self.computers.reap_expired()
            except BackendError as exc:
                log.warning("expiry sweep failed: %s", exc)
            await anyio.sleep(self.settings.sandbox.reaper_interval_s)

    async def _stop_warm(self) -> None:
        """A graceful exit stops the warm runtimes (unless `pool.keep_warm_after_exit`): nothing
        idles on the host once the client is gone. Claimed sandboxes and computers stay."""
        if self.settings.pool.keep_warm_after_exit:
            return
        with anyio.move_on_after(self.settings.pool.exit_grace_s) as scope:
            try:
                stopped = await self.pools.stop_warm("dockyard stopped: warm runtimes are not kept after exit")
            except DockyardError as exc:
                log.warning("could not stop the warm runtimes at exit: %s", exc)
                return
            if stopped:
                log.info("stopped %d warm runtimes at exit", stopped)
        if scope.cancelled_caught:
            log.warning(
                "stopping the warm runtimes took over %ss; the rest are adopted at the next start",
                self.settings.pool.exit_grace_s,
            )


async def _networks_left(docker: DockerBackend, provisioner: Provisioner) -> bool:
    """Whether a network of this instance still exists (when Docker cannot say: assume so)."""
    try:
        return bool(await docker.list_networks(provisioner.labels))
    except DockyardError:
        return True
