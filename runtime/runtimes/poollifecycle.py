"""The runtimes' lifecycle in a pool: provisioning and refills, release and recycling, removal.

A runtime is started (for the warm shelf, or cold for a claim) and undone entirely if any step
fails; a released one drains, is wiped and checked, and goes back on the shelf only if the pool
wants it and it is verifiably clean, else it is destroyed and the pool refills behind it. The
upkeep loops evict, lose and note runtimes through here. Every change of a runtime's state is
written to the store with a `PoolEvent` (`poolstate`) and mirrored in the pool's record under
its lock; capacity a runtime frees goes at once to the claims waiting in the pool's queue.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVarTuple

import anyio
import anyio.abc
from sqlmodel import Session, select

from dockyard.runtime.runtimes.images import BuildState
from dockyard.runtime.runtimes.poolstate import Bind, Pool, drain, new_runtime_id, transition
from dockyard.runtime.runtimes.poolturns import serve
from dockyard.runtime.runtimes.provision import Provisioner
from dockyard.runtime.substrate.errors import DockyardError, NotRunningError, TemplateNotFoundError
from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import (
    Computer,
    PoolEvent,
    Runtime,
    RuntimeState,
    Sandbox,
    SandboxStatus,
    Store,
    utcnow,
)

__all__ = ["PoolLifecycle"]

log = logging.getLogger(__name__)
Ts = TypeVarTuple("Ts")

_FILL_BACKOFF_S = 5.0
_NEVER_REUSED = "a computer is never reused: a fresh browser keeps no cookies, storage or history"


class PoolLifecycle:
    """Starts, recycles and removes the runtimes of every pool, and keeps each pool filled."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        provisioner: Provisioner,
        pools: Mapping[str, Pool],
        publish: Callable[[], None],
    ) -> None:
        self._settings = settings.pool
        self._quotas = settings.quotas
        self._store = store
        self._provisioner = provisioner
        self._pools = pools
        self._publish = publish
        self._where: dict[str, tuple[Pool, str]] = {}  # container id -> (pool, runtime id)
        self._tg: anyio.abc.TaskGroup | None = None
        # Told the id and workspace of each sandbox a lost runtime took with it.
        self.on_sandbox_lost: Callable[[str, str], Awaitable[None]] | None = None
        self._reconciling = False  # no refills until every surviving runtime is counted

    def attach(self, tg: anyio.abc.TaskGroup | None) -> None:
        """Run background work (fills, recycling, removals) in `tg`; None: nothing may start."""
        self._tg = tg

    def pool(self, template: str) -> Pool:
        """A configured template's pool."""
        pool = self._pools.get(template)
        if pool is None:
            raise TemplateNotFoundError(template, list(self._pools))
        return pool

    def serve(self, pool: Pool) -> None:
        """Under the pool's lock: give queued claims their turns while there is capacity."""
        serve(pool, self._quotas.pool_share(pool.shape.max), self.start_destroy)

    # -- release and recycling ----------------------------------------------------------

    async def release(self, runtime_id: str, bind: Bind, reason: str) -> None:
        """End a claim: `bind` closes the owner's record; the runtime is recycled or destroyed."""
        row = await self._store.run(drain(runtime_id, bind, reason))
        if row is None:
            return
        pool = self.pool(row.template)
        async with pool.lock:
            pool.states[row.id] = RuntimeState.DRAINING
            pool.holders.pop(row.id, None)
            self.serve(pool)  # a claim of that workspace waiting on its share may go now
        self._spawn(self._recycle, pool, row)

    async def resize(self, runtime_id: str, cpus: float, memory_mb: int) -> None:
        """Give a claimed runtime other CPU and memory limits (restored when it is recycled)."""
        row = await self._store.get(Runtime, runtime_id)
        if row is None or row.container_id is None:
            return
        await self._provisioner.resize(row.container_id, cpus, memory_mb)

        def save(session: Session) -> None:
            fresh = session.get(Runtime, runtime_id)
            if fresh is not None:
                fresh.cpus, fresh.memory_mb = cpus, memory_mb
                session.add(fresh)

        await self._store.run(save)

    async def _recycle(self, pool: Pool, row: Runtime) -> None:
        tpl = self._provisioner.template(pool.template) if pool.template in self._pools else None
        if tpl is not None and tpl.kind == "computer":
            # The pool refills behind it (as after any destroy) with a browser that never had an owner.
            await self.destroy(pool, row, _NEVER_REUSED)
            return
        async with pool.lock:  # a runtime nobody will want is removed without wiping it first
            reason = None if self._wanted(pool) else f"the pool already holds its target of {pool.target} warm"
        if reason is None and not self._settings.recycle:
            reason = "recycling is off"
        elif reason is None and (tpl is None or row.network != tpl.network or row.container_id is None):
            reason = "it no longer matches its template"
        elif reason is None and row.network != "none":
            reason = "it is on its last owner's workspace network"
        elif reason is None and row.container_id is not None and self._provisioner.paused_outside(row.container_id):
            reason = "it was paused outside dockyard, so it cannot be wiped"
        elif reason is None:
            assert row.container_id is not None and tpl is not None
            try:
                if (row.cpus, row.memory_mb) != (tpl.cpus, tpl.memory_mb):
                    await self.resize(row.id, tpl.cpus, tpl.memory_mb)
                left = await self._provisioner.wipe(row.id, row.container_id)
            except DockyardError as exc:
                left = [str(exc)]
            if left:
                reason = "not verifiably clean: " + "; ".join(left[:3])
        async with pool.lock:
            if reason is None and not self._wanted(pool):
                reason = f"the pool already holds its target of {pool.target} warm"
            if reason is None:
                pool.states[row.id] = RuntimeState.WARM
        if reason is not None:
            await self.destroy(pool, row, reason)
            return

        recycled = "recycled: wiped and verified clean"
        await self._store.run(transition(row.id, RuntimeState.WARM, recycled, only_from=(RuntimeState.DRAINING,)))
        await self._add_warm(pool, row.id)

    def _wanted(self, pool: Pool) -> bool:
        """Under the pool's lock: would one more warm runtime be used (a claim waits, or below target)?"""
        return len(pool.queue) > 0 or pool.count(RuntimeState.WARM) + len(pool.filling) < pool.target

    async def _add_warm(self, pool: Pool, runtime_id: str) -> None:
        async with pool.lock:
            # one step: a runtime between "filling" and "warm" would count as neither, and a
            # refill in that moment would start one too many
            pool.filling.discard(runtime_id)
            pool.states[runtime_id] = RuntimeState.WARM
            pool.warm.append(runtime_id)
            self.serve(pool)
        self._publish()

    # -- provisioning and removal -------------------------------------------------------

    async def provision(
        self,
        pool: Pool,
        runtime_id: str,
        network: str,
        workspace_id: str | None,
        reason: str,
        notify: Callable[[BuildState], Awaitable[None]] | None = None,
    ) -> Runtime:
        """Start a container for a runtime already counted as provisioning; undo it all on failure."""
        tpl = self._provisioner.template(pool.template)
        row = Runtime(
            id=runtime_id,
            template=pool.template,
            image="",
            container_name="",
            network=network,
            cpus=tpl.cpus,
            memory_mb=tpl.memory_mb,
        )

        def insert(session: Session) -> None:
            session.add(
                PoolEvent(
                    template=pool.template,
                    runtime_id=runtime_id,
                    from_state=None,
                    to_state=RuntimeState.PROVISIONING,
                    reason=reason,
                )
            )
            session.add(row)

        try:
            await self._store.run(insert)
            started = await self._provisioner.start(
                runtime_id, pool.template, network=network, workspace_id=workspace_id, notify=notify
            )
            self._where[started.container_id] = (pool, runtime_id)
            row.image, row.container_id, row.container_name = started.image, started.container_id, started.name
            row.docker_network = started.docker_network
            await self._store.add(row)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.destroy(pool, row, f"provisioning failed: {exc}")
            raise
        return row

    async def _fill(self, pool: Pool, runtime_id: str) -> None:
        """Background: provision one warm runtime, check it, and put it on the shelf."""
        try:
            await self._provisioner.wait_image(pool.template)
            row = await self.provision(pool, runtime_id, pool.network, None, "replenishing warm runtimes")
            assert row.container_id is not None
            left = await self._provisioner.leftovers(row.container_id, runtime_id, pool.template)
            if left:
                await self.destroy(pool, row, "failed its first probe: " + "; ".join(left[:3]))
                pool.fill_after = time.monotonic() + _FILL_BACKOFF_S
                return

            await self._store.run(
                transition(runtime_id, RuntimeState.WARM, "ready", only_from=(RuntimeState.PROVISIONING,))
            )
            await self._add_warm(pool, runtime_id)
        except DockyardError as exc:
            log.warning("could not provision a warm runtime for pool '%s': %s", pool.template, exc)
            pool.fill_after = time.monotonic() + _FILL_BACKOFF_S
        finally:
            with anyio.CancelScope(shield=True):
                async with pool.lock:
                    pool.filling.discard(runtime_id)
                    if pool.states.get(runtime_id) == RuntimeState.PROVISIONING:
                        pool.states.pop(runtime_id)

    def _replenish(self, pool: Pool) -> None:
        """Start filling toward the target, within max (no-op while a failed fill backs off)."""
        if self._tg is None or self._reconciling or not pool.prewarms or time.monotonic() < pool.fill_after:
            return
        need = pool.target - pool.count(RuntimeState.WARM) - len(pool.filling)
        room = pool.shape.max - pool.total
        for _ in range(max(min(need, room), 0)):
            runtime_id = new_runtime_id()
            pool.states[runtime_id] = RuntimeState.PROVISIONING
            pool.filling.add(runtime_id)
            self._spawn(self._fill, pool, runtime_id)

    def start_destroy(self, pool: Pool, runtime_id: str, reason: str) -> None:
        """Under the pool's lock: stop counting a runtime and remove it in the background."""
        pool.states[runtime_id] = RuntimeState.DESTROYING

        async def remove() -> None:
            row = await self._store.get(Runtime, runtime_id)
            if row is not None:
                await self.destroy(pool, row, reason)

        self._spawn(remove)

    async def destroy(self, pool: Pool, row: Runtime, reason: str, *, final: str = RuntimeState.DESTROYED) -> None:
        """Remove a runtime's container and record why; its capacity goes to waiting claims."""
        async with pool.lock:
            if pool.states.get(row.id) not in (None, RuntimeState.DESTROYING):
                pool.states[row.id] = RuntimeState.DESTROYING
            if row.id in pool.warm:
                pool.warm.remove(row.id)
            self.serve(pool)

        with anyio.CancelScope(shield=True):
            await self._store.run(transition(row.id, RuntimeState.DESTROYING, reason, only_from=RuntimeState.LIVE))
            if row.container_id:
                await self._provisioner.remove(row.container_id, row.id)
                self._where.pop(row.container_id, None)
            if row.docker_network not in ("none", "bridge"):
                await self._provisioner.remove_network(row.docker_network)
            await self._store.run(transition(row.id, final, reason, only_from=RuntimeState.LIVE))
            async with pool.lock:
                pool.states.pop(row.id, None)
                pool.holders.pop(row.id, None)
                self.serve(pool)
                self._replenish(pool)
        self._publish()

    # -- what the upkeep loops and start-up call --------------------------------------

    def containers_of(self, pool: Pool, state: str) -> list[tuple[str, str]]:
        """(runtime id, container id) of a pool's runtimes in one state."""
        return [(rid, cid) for cid, (p, rid) in self._where.items() if p is pool and pool.states.get(rid) == state]

    def locate(self, container_id: str) -> tuple[Pool, str] | None:
        """The pool and runtime id of one of our containers."""
        return self._where.get(container_id)

    async def evict(self, pool: Pool, runtime_id: str, reason: str) -> bool:
        """Destroy a warm runtime, unless a claim took it meanwhile; True if it was evicted."""
        async with pool.lock:
            if runtime_id not in pool.warm:
                return False
            pool.warm.remove(runtime_id)
            pool.states[runtime_id] = RuntimeState.DESTROYING
        row = await self._store.get(Runtime, runtime_id)
        if row is not None:
            await self.destroy(pool, row, reason)
        return True

    async def lose(self, pool: Pool, runtime_id: str, reason: str) -> None:
        """A claimed runtime's container died or vanished: its sandbox or computer is lost, its place freed."""

        def end(session: Session) -> list[tuple[str, str]]:
            lost: list[tuple[str, str]] = []
            for model in (Sandbox, Computer):
                stmt = select(model).where(model.runtime_id == runtime_id, model.status == SandboxStatus.RUNNING)
                for claim in session.exec(stmt).all():
                    claim.status, claim.ended_at, claim.end_reason = SandboxStatus.LOST, utcnow(), reason
                    session.add(claim)
                    if isinstance(claim, Sandbox):
                        lost.append((claim.id, claim.workspace_id))
            return lost

        row = await self._store.get(Runtime, runtime_id)
        if row is None:
            return
        lost = await self._store.run(end)
        await self.destroy(pool, row, reason, final=RuntimeState.LOST)
        for sandbox_id, workspace_id in lost:
            if self.on_sandbox_lost is not None:
                await self.on_sandbox_lost(sandbox_id, workspace_id)

    async def note(self, pool: Pool, runtime_id: str, reason: str) -> None:
        """Record something about a runtime that changes nothing of its state (it stays where it is)."""
        state = pool.states.get(runtime_id)
        log.warning("runtime %s of pool %s: %s", runtime_id, pool.template, reason)
        await self._store.add(
            PoolEvent(
                template=pool.template,
                runtime_id=runtime_id,
                from_state=state,
                to_state=state or "unknown",
                reason=reason,
            )
        )

    async def replenish(self, pool: Pool) -> None:
        async with pool.lock:
            self._replenish(pool)

    def adopt(self, pool: Pool, row: Runtime) -> None:
        """Count a runtime that survived a restart (warm ones go back on the shelf)."""
        self._where[row.container_id or ""] = (pool, row.id)
        pool.states[row.id] = row.state
        if row.state == RuntimeState.CLAIMED and row.workspace_id:
            pool.holders[row.id] = row.workspace_id
        if row.state == RuntimeState.WARM:
            pool.warm.append(row.id)

    def recycle_later(self, pool: Pool, row: Runtime) -> None:
        self._spawn(self._recycle, pool, row)

    def pause_refills(self, paused: bool) -> None:
        """While start-up reconciliation counts the surviving runtimes, nothing is refilled."""
        self._reconciling = paused

    def _spawn(self, fn: Callable[[*Ts], Coroutine[Any, Any, None]], *args: *Ts) -> None:
        if self._tg is None:
            raise NotRunningError("the pool manager")
        self._tg.start_soon(fn, *args)
