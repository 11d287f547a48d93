"""Warm pools: runtimes started before anyone asks, handed over by an atomic claim.

Each template has a pool. The desired shape (min, max, and the autoscaler's target between
them) comes from settings; the observed state of every runtime lives in the store, where each
transition is written together with a `PoolEvent`, and is mirrored in memory for scheduling:

    provisioning -> warm -> claimed -> draining -> warm        (recycled, verified clean)
                                               \\-> destroying  (over target, unhealthy, not clean,
                                                                or a computer: never reused)

A claim takes a warm runtime (no container start on its path), or cold-starts one while the
pool is below `max`, or waits in a queue that is fair between workspaces until a runtime is
released or the claim times out. No workspace holds more than its share of a pool
(`quotas.workspace_pool_share` of `max`, at least one): a claim past it waits behind the other
workspaces until one of its own is given back, so one workspace can never starve the rest.
Background loops keep the pool at its target, evict what died or fails its probe (also on
Docker's die events), and grow or shrink the target.

`PoolManager` is the one surface the services and the upkeep loops use. Its rooms: the states,
transitions and in-memory record in `poolstate`, the fair queue's turns in `poolturns`, claims
in `poolclaims`, and the runtimes' lifecycle (provisioning, refills, release and recycling,
removal) in `poollifecycle`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import anyio.abc
from sqlmodel import Session

from dockyard.runtime.runtimes.images import BuildState
from dockyard.runtime.runtimes.poolclaims import PoolClaims
from dockyard.runtime.runtimes.poollifecycle import PoolLifecycle
from dockyard.runtime.runtimes.poolstate import Bind, Lease, Pool
from dockyard.runtime.runtimes.provision import Provisioner
from dockyard.runtime.substrate.settings import PoolShape, Settings
from dockyard.runtime.substrate.store import PoolState, Runtime, Store

__all__ = ["Bind", "Lease", "PoolManager"]


class PoolManager:
    """Every template's pool: claims, releases, recycling and the loops that keep pools healthy."""

    def __init__(self, settings: Settings, store: Store, provisioner: Provisioner) -> None:
        self._store = store
        self._pools = {name: Pool(name, tpl.pool, tpl.network) for name, tpl in settings.templates.items()}
        self._pools_gone: dict[str, Pool] = {}
        self._dirty = anyio.Event()
        self._life = PoolLifecycle(settings, store, provisioner, self._pools, self._publish)
        self._claims = PoolClaims(settings, store, self._life, self._publish)

    # -- claims and releases ------------------------------------------------------------

    async def claim(
        self,
        template: str,
        workspace_id: str,
        bind: Bind,
        *,
        network: str,
        timeout_s: float | None = None,
        notify: Callable[[BuildState], Awaitable[None]] | None = None,
    ) -> Lease:
        """Hand one runtime of `template` to a new owner; `bind` records the owner in the same transaction."""
        pool = self._life.pool(template)
        return await self._claims.claim(pool, workspace_id, bind, network=network, timeout_s=timeout_s, notify=notify)

    async def release(self, runtime_id: str, bind: Bind, reason: str) -> None:
        """End a claim: `bind` closes the owner's record; the runtime is recycled or destroyed."""
        await self._life.release(runtime_id, bind, reason)

    async def resize(self, runtime_id: str, cpus: float, memory_mb: int) -> None:
        """Give a claimed runtime other CPU and memory limits (restored when it is recycled)."""
        await self._life.resize(runtime_id, cpus, memory_mb)

    # -- what the upkeep loops and start-up call --------------------------------------

    @property
    def pools(self) -> list[Pool]:
        return list(self._pools.values())

    def containers_of(self, pool: Pool, state: str) -> list[tuple[str, str]]:
        """(runtime id, container id) of a pool's runtimes in one state."""
        return self._life.containers_of(pool, state)

    def locate(self, container_id: str) -> tuple[Pool, str] | None:
        """The pool and runtime id of one of our containers."""
        return self._life.locate(container_id)

    async def evict(self, pool: Pool, runtime_id: str, reason: str) -> bool:
        """Destroy a warm runtime, unless a claim took it meanwhile; True if it was evicted."""
        return await self._life.evict(pool, runtime_id, reason)

    async def stop_warm(self, reason: str) -> int:
        """At a graceful exit: refill nothing more and destroy every warm runtime of every pool
        (claimed ones stay with their owners); returns how many were stopped."""
        self._life.pause_refills(True)
        stopped: list[str] = []

        async def stop(pool: Pool, runtime_id: str) -> None:
            if await self.evict(pool, runtime_id, reason):
                stopped.append(runtime_id)

        async with anyio.create_task_group() as tg:
            for pool in [*self._pools.values(), *self._pools_gone.values()]:
                for runtime_id in list(pool.warm):
                    tg.start_soon(stop, pool, runtime_id)
        return len(stopped)

    async def lose(self, pool: Pool, runtime_id: str, reason: str) -> None:
        """A claimed runtime's container died or vanished: its sandbox or computer is lost, its place freed."""
        await self._life.lose(pool, runtime_id, reason)

    @property
    def on_sandbox_lost(self) -> Callable[[str, str], Awaitable[None]] | None:
        """Told the id and workspace of each sandbox that a lost runtime took with it."""
        return self._life.on_sandbox_lost

    @on_sandbox_lost.setter
    def on_sandbox_lost(self, callback: Callable[[str, str], Awaitable[None]] | None) -> None:
        self._life.on_sandbox_lost = callback

    async def note(self, pool: Pool, runtime_id: str, reason: str) -> None:
        """Record something about a runtime that changes nothing of its state (it stays where it is)."""
        await self._life.note(pool, runtime_id, reason)

    async def replenish(self, pool: Pool) -> None:
        """Start filling the pool toward its target."""
        await self._life.replenish(pool)

    def set_target(self, pool: Pool, target: int) -> None:
        pool.target = max(pool.shape.min, min(pool.shape.max, target))
        self._publish()

    def adopt(self, pool: Pool, row: Runtime) -> None:
        """Count a runtime that survived a restart (warm ones go back on the shelf)."""
        self._life.adopt(pool, row)

    async def destroy(self, pool: Pool, row: Runtime, reason: str) -> None:
        """Remove a runtime's container and record why."""
        await self._life.destroy(pool, row, reason)

    def recycle_later(self, pool: Pool, row: Runtime) -> None:
        """Recycle (or destroy) a draining runtime in the background."""
        self._life.recycle_later(pool, row)

    def pool_of(self, template: str) -> Pool:
        """The pool of a template, or a never-refilled one if the template left the config."""
        return self._pools.get(template) or self._adhoc(template)

    def is_configured(self, template: str) -> bool:
        return template in self._pools

    def pause_refills(self, paused: bool) -> None:
        """While start-up reconciliation counts the surviving runtimes, nothing is refilled."""
        self._life.pause_refills(paused)

    def _adhoc(self, template: str) -> Pool:
        """A pool for runtimes of a template no longer in the config: never refilled."""
        pool = self._pools_gone.setdefault(template, Pool(template, PoolShape(min=0, max=1), "none"))
        return pool

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the background work (fills, recycling, publishing) until cancelled."""
        async with anyio.create_task_group() as tg:
            self._life.attach(tg)
            tg.start_soon(self._publisher)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._life.attach(None)

    # -- publishing ---------------------------------------------------------------------

    def _publish(self) -> None:
        """Ask the publisher to write targets and queue depths to the store (coalesced)."""
        self._dirty.set()

    async def _publisher(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty = anyio.Event()
            states = [
                PoolState(template=p.template, target=p.target, queue_depth=len(p.queue)) for p in self._pools.values()
            ]

            def write(session: Session, states: list[PoolState] = states) -> None:
                for state in states:
                    session.merge(state)

            await self._store.run(write)
            await anyio.sleep(0.1)
