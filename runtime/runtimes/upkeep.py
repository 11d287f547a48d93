"""Start-up recovery and the loops that keep pools healthy and sized.

- reconcile (once, at start): match the store's live runtimes with our labelled containers;

- health (every `pool.health_interval_s`): probe each warm runtime, evict the dead and the
  unhealthy, notice claimed runtimes whose container vanished, refill to the target;
- events: Docker's die/destroy events for our containers act at once, between health checks;
  pause/unpause events by anyone but dockyard mark a sandbox paused (its tools say so);
- autoscaler (every `pool.autoscale_interval_s`, when enabled): grow the target toward max
  while claims miss the warm shelf or queue, shrink it one step toward min per tick once no
  claim has missed for `pool.scale_down_after_s` (the hysteresis that stops flapping).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import anyio
from sqlmodel import Session, col, select

from dockyard.runtime.runtimes.pool import PoolManager
from dockyard.runtime.runtimes.provision import Provisioner
from dockyard.runtime.substrate.docker import DockerBackend
from dockyard.runtime.substrate.errors import DockyardError
from dockyard.runtime.substrate.settings import PoolSettings
from dockyard.runtime.substrate.store import Runtime, RuntimeState, Sandbox, SandboxStatus, Store, utcnow

__all__ = ["PoolUpkeep"]

log = logging.getLogger(__name__)

_EVENTS = ["die", "destroy", "pause", "unpause"]
_PAUSED_NOTE = "paused outside dockyard; kept as it is (unpause it to use it)"


class PoolUpkeep:
    """Runs the health loop, the events watcher and the autoscaler over a pool manager."""

    def __init__(
        self, settings: PoolSettings, store: Store, pools: PoolManager, provisioner: Provisioner, docker: DockerBackend
    ) -> None:
        self._settings = settings
        self._store = store
        self._pools = pools
        self._provisioner = provisioner
        self._docker = docker

    async def reconcile(self) -> None:
        """At start: claimed runtimes stay with their owners, warm ones go back on the shelf,
        runtimes caught mid-provisioning, mid-wipe or mid-removal are removed (or wiped again),
        containers the store does not know are removed, runtimes whose container is gone are
        lost, with their sandboxes, and the host directories (control channels, DevTools
        sockets) of runtimes no longer live are removed.
        """
        containers = await self._docker.list_containers(self._provisioner.labels)
        self._pools.pause_refills(True)
        try:
            await self._match(containers)
        finally:
            self._pools.pause_refills(False)
        await self._store.run(_orphaned_sandboxes_lost)
        live = await self._store.run(
            lambda s: set(s.exec(select(Runtime.id).where(col(Runtime.state).in_(RuntimeState.LIVE))).all())
        )
        self._provisioner.sweep(live)
        await self._provisioner.disks.sweep(live)  # before any refill: every disk now is a known runtime's

    async def _match(self, containers: list[dict]) -> None:
        by_id = {c["Id"]: c for c in containers}
        rows = await self._store.run(
            lambda s: list(s.exec(select(Runtime).where(col(Runtime.state).in_(RuntimeState.LIVE))).all())
        )
        known: set[str] = set()
        for row in rows:
            known.add(row.container_id or "")
            pool = self._pools.pool_of(row.template)
            container = by_id.get(row.container_id or "")
            if container is not None and container["State"] == "paused" and row.state == RuntimeState.CLAIMED:
                # Most likely paused by dockyard for a snapshot when it stopped: resumed, kept.
                try:
                    await self._docker.unpause(row.container_id or "")
                    container = {**container, "State": "running"}
                except DockyardError:
                    pass
            if container is not None and container["State"] != "running" and row.state == RuntimeState.CLAIMED:
                try:
                    await self._provisioner.start_existing(row.container_id or "")
                    container = {**container, "State": "running"}
                except DockyardError:
                    pass
            alive = container is not None and container["State"] == "running"
            configured = self._pools.is_configured(row.template)
            if alive and (row.state == RuntimeState.CLAIMED or (row.state == RuntimeState.WARM and configured)):
                self._pools.adopt(pool, row)
            elif alive and row.state == RuntimeState.DRAINING:
                self._pools.adopt(pool, row)
                self._pools.recycle_later(pool, row)
            elif row.state == RuntimeState.CLAIMED or (row.state == RuntimeState.WARM and container is None):
                await self._pools.lose(pool, row.id, "its container was gone when dockyard started")
            else:
                await self._pools.destroy(pool, row, f"found {row.state} at start-up")
        for container in containers:
            if container["Id"] not in known:
                await self._provisioner.remove(container["Id"], (container.get("Labels") or {}).get("dockyard.runtime"))

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._every, self._settings.health_interval_s, self.check_health)
            tg.start_soon(self._watch_events)
            if self._settings.autoscale_enabled:
                tg.start_soon(self._every, self._settings.autoscale_interval_s, self.autoscale)

    async def _every(self, interval_s: float, step: Callable[[], Awaitable[object]]) -> None:
        while True:
            await anyio.sleep(interval_s)
            try:
                await step()
            except DockyardError as exc:
                log.warning("pool upkeep step failed: %s", exc)

    async def check_health(self) -> None:
        """Evict warm runtimes that died or fail their probe; lose claimed ones whose container went."""
        # Who to check is fixed before Docker is asked, so a runtime started meanwhile is not
        # mistaken for one whose container is missing.
        checks = [
            (
                pool,
                self._pools.containers_of(pool, RuntimeState.WARM),
                self._pools.containers_of(pool, RuntimeState.CLAIMED),
            )
            for pool in self._pools.pools
        ]
        states = {c["Id"]: c["State"] for c in await self._docker.list_containers(self._provisioner.labels)}
        running = {cid for cid, state in states.items() if state == "running"}
        for pool, warm, claimed in checks:
            for runtime_id, container_id in warm:
                if container_id not in running:
                    await self._pools.evict(pool, runtime_id, "unhealthy: its container is not running")
                    continue
                left = await self._provisioner.leftovers(container_id, runtime_id, pool.template)
                if left:
                    await self._pools.evict(pool, runtime_id, "unhealthy: " + "; ".join(left[:3]))
            for runtime_id, container_id in claimed:
                state = states.get(container_id)
                if (state == "paused") != self._docker.paused_outside(container_id):
                    state = await self._docker.state(container_id)  # the list may predate a (un)pause event
                if state == "paused":
                    # dockyard's own pause (a snapshot) is no stop; someone else's is reported and
                    # kept: the sandbox and its /workspace are still there, unpausing resumes it.
                    if self._docker.seen_paused(container_id, True):
                        await self._pools.note(pool, runtime_id, _PAUSED_NOTE)
                    continue
                if state is not None:
                    self._docker.seen_paused(container_id, False)
                if state == "running":
                    running.add(container_id)
                if container_id not in running and pool.states.get(runtime_id) == RuntimeState.CLAIMED:
                    await self._pools.lose(pool, runtime_id, "its container stopped outside dockyard")
            await self._pools.replenish(pool)

    async def _watch_events(self) -> None:
        while True:
            try:
                async for event in self._docker.events(self._provisioner.labels, _EVENTS):
                    await self._on_event(event)
            except DockyardError as exc:
                log.warning("Docker events stream ended (%s); reconnecting", exc)
            await anyio.sleep(1.0)

    async def _on_event(self, event: dict) -> None:
        found = self._pools.locate(event.get("id", ""))
        if found is None:
            return
        pool, runtime_id = found
        state = pool.states.get(runtime_id)
        action, container_id = event.get("Action"), event.get("id", "")
        if action in ("pause", "unpause"):
            if self._docker.seen_paused(container_id, action == "pause") and state == RuntimeState.CLAIMED:
                await self._pools.note(pool, runtime_id, _PAUSED_NOTE)
            return
        why = f"its container {'was removed' if event.get('Action') == 'destroy' else 'died'} outside dockyard"
        if state == RuntimeState.WARM:
            await self._pools.evict(pool, runtime_id, f"unhealthy: {why}")
        elif state == RuntimeState.CLAIMED:
            await self._pools.lose(pool, runtime_id, why)

    async def autoscale(self) -> None:
        """One autoscaler tick over every pool."""
        now = time.monotonic()
        for pool in self._pools.pools:
            demand, pool.misses = len(pool.queue) + pool.misses, 0
            if demand:
                pool.last_busy = now
                self._pools.set_target(pool, pool.target + demand)
            elif now - pool.last_busy >= self._settings.scale_down_after_s and pool.target > pool.shape.min:
                self._pools.set_target(pool, pool.target - 1)
                surplus = pool.count(RuntimeState.WARM) - pool.target
                for runtime_id in list(pool.warm)[: max(surplus, 0)]:
                    await self._pools.evict(pool, runtime_id, "autoscaler: idle, shrinking toward min")
            await self._pools.replenish(pool)


def _orphaned_sandboxes_lost(session: Session) -> None:
    """Sandboxes still marked running whose runtime is no longer claimed by them are lost."""
    live = select(Runtime.sandbox_id).where(Runtime.state == RuntimeState.CLAIMED)
    stmt = select(Sandbox).where(Sandbox.status == SandboxStatus.RUNNING, col(Sandbox.id).not_in(live))
    for sandbox in session.exec(stmt).all():
        sandbox.status, sandbox.ended_at = SandboxStatus.LOST, utcnow()
        sandbox.end_reason = "its runtime was gone when dockyard started"
        session.add(sandbox)
