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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVarTuple

import anyio
import anyio.abc
from sqlmodel import Session, select

from dockyard.runtime.runtimes.images import BuildState
from dockyard.runtime.runtimes.poolstate import (
    Bind,
    Grant,
    Lease,
    Pool,
    claim_warm,
    drain,
    move,
    new_runtime_id,
    timed_bind,
    transition,
)
from dockyard.runtime.runtimes.provision import Provisioner
from dockyard.runtime.runtimes.waitqueue import Waiter
from dockyard.runtime.substrate.errors import (
    CapacityError,
    DockyardError,
    NotRunningError,
    PoolExhaustedError,
    QuotaExceededError,
    TemplateNotFoundError,
)
from dockyard.runtime.substrate.settings import PoolShape, Settings
from dockyard.runtime.substrate.store import (
    Computer,
    PoolEvent,
    PoolState,
    Runtime,
    RuntimeState,
    Sandbox,
    SandboxStatus,
    Store,
    utcnow,
)

__all__ = ["Bind", "Lease", "PoolManager"]

log = logging.getLogger(__name__)
Ts = TypeVarTuple("Ts")

_FILL_BACKOFF_S = 5.0
_NEVER_REUSED = "a computer is never reused: a fresh browser keeps no cookies, storage or history"


class PoolManager:
    """Every template's pool: claims, releases, recycling and the loops that keep pools healthy."""

    def __init__(self, settings: Settings, store: Store, provisioner: Provisioner) -> None:
        self._settings = settings.pool
        self._quotas = settings.quotas
        self._store = store
        self._provisioner = provisioner
        self._pools = {name: Pool(name, tpl.pool, tpl.network) for name, tpl in settings.templates.items()}
        self._pools_gone: dict[str, Pool] = {}
        self._where: dict[str, tuple[Pool, str]] = {}  # container id -> (pool, runtime id)
        self._tg: anyio.abc.TaskGroup | None = None
        self._reconciling = False  # no refills until every surviving runtime is counted
        self._dirty = anyio.Event()

    # -- claims -------------------------------------------------------------------------

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
        pool = self._pool(template)
        started = time.perf_counter()
        deadline = time.monotonic() + (timeout_s or self._settings.claim_timeout_s)
        needs_cold = network != pool.network or network != "none"  # a network is the workspace's own
        while True:
            grant = await self._turn(pool, workspace_id, needs_cold, deadline)
            timed = timed_bind(_held_by(workspace_id, bind), started, grant.warm)
            if grant.warm:
                row = await self._claim_warm(pool, grant.runtime_id, timed)
                if row is None:
                    continue  # it died a moment ago and was evicted: take the next turn
            else:
                row = await self._claim_cold(pool, grant.runtime_id, timed, network, workspace_id, notify)
            await self.replenish(pool)
            return Lease(row, grant.warm, (time.perf_counter() - started) * 1000)

    async def _turn(self, pool: Pool, workspace_id: str, needs_cold: bool, deadline: float) -> Grant:
        async with pool.lock:
            # Every claim joins the queue and is served at once if its turn and room allow it.
            waiter: Waiter[Grant] = pool.queue.push(workspace_id, needs_cold=needs_cold)
            self._serve(pool)
            if waiter.grant is None or not waiter.grant.warm:
                pool.misses += 1
                pool.last_busy = time.monotonic()
            if waiter.grant is not None:
                return waiter.grant
        self._publish()
        try:
            with anyio.move_on_after(max(deadline - time.monotonic(), 0)):
                await waiter.granted.wait()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._give_up(pool, waiter)
            raise
        if waiter.grant is None:
            async with pool.lock:
                if pool.queue.remove(waiter):
                    self._publish()
                    raise self._refusal(pool, workspace_id)
        assert waiter.grant is not None
        self._publish()
        return waiter.grant

    async def _give_up(self, pool: Pool, waiter: Waiter[Grant]) -> None:
        """A waiter was cancelled: leave the queue, or hand back what it was just granted."""
        async with pool.lock:
            if pool.queue.remove(waiter) or waiter.grant is None:
                return
            grant = waiter.grant
            pool.holders.pop(grant.runtime_id, None)
            if grant.warm:
                pool.states[grant.runtime_id] = RuntimeState.WARM
                pool.warm.appendleft(grant.runtime_id)
            else:
                pool.states.pop(grant.runtime_id, None)
            self._serve(pool)
        self._publish()

    def _refusal(self, pool: Pool, workspace_id: str) -> CapacityError:
        """Why a claim waited in vain: its workspace held its share, or the pool was full."""
        share, held = self._quotas.pool_share(pool.shape.max), pool.held(workspace_id)
        if held >= share and share < pool.shape.max:
            return QuotaExceededError(
                f"quota workspace_pool_share reached: workspace '{workspace_id}' holds {held} of pool "
                f"'{pool.template}' (its share: {share} of max {pool.shape.max}, workspace_pool_share "
                f"{self._quotas.workspace_pool_share:g}) and none of them was given back within "
                f"{self._settings.claim_timeout_s:g} s; destroy one you no longer need, or ask the operator for a higher quota"
            )
        return PoolExhaustedError(pool.template, pool.shape.max, self._settings.claim_timeout_s)

    def _grant(self, pool: Pool, waiter: Waiter[Grant]) -> Grant | None:
        """Under the pool's lock: a warm runtime if one fits, else room for a cold start, else None;
        what is granted counts toward the waiter's workspace's share from now on."""
        grant = self._room(pool, waiter.needs_cold)
        if grant is not None:
            pool.holders[grant.runtime_id] = waiter.workspace_id
        return grant

    def _room(self, pool: Pool, needs_cold: bool) -> Grant | None:
        if not needs_cold and pool.warm:
            runtime_id = pool.warm.popleft()
            pool.states[runtime_id] = RuntimeState.CLAIMED
            return Grant(runtime_id, warm=True)
        if needs_cold and pool.total >= pool.shape.max and pool.warm:
            # An idle warm runtime of the wrong network gives its place to this claim.
            self._start_destroy(pool, pool.warm.pop(), "made room for a claim with another network")
        if pool.total < pool.shape.max:
            runtime_id = new_runtime_id()
            pool.states[runtime_id] = RuntimeState.PROVISIONING
            return Grant(runtime_id, warm=False)
        return None

    def _serve(self, pool: Pool) -> None:
        """Under the pool's lock: give queued claims their turns while there is capacity, passing
        over workspaces that hold their share."""
        share = self._quotas.pool_share(pool.shape.max)
        while (waiter := pool.queue.peek(lambda workspace_id: pool.held(workspace_id) < share)) is not None:
            grant = self._grant(pool, waiter)
            if grant is None:
                return
            pool.queue.take(waiter)
            waiter.grant = grant
            waiter.granted.set()

    async def _claim_warm(self, pool: Pool, runtime_id: str, bind: Bind) -> Runtime | None:
        try:
            row = await self._store.run(claim_warm(runtime_id, bind))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._back_to_warm(pool, runtime_id)
            raise
        if row is None:
            async with pool.lock:
                pool.states.pop(runtime_id, None)
                pool.holders.pop(runtime_id, None)
        return row

    async def _back_to_warm(self, pool: Pool, runtime_id: str) -> None:
        async with pool.lock:
            pool.holders.pop(runtime_id, None)
            if pool.states.get(runtime_id) == RuntimeState.CLAIMED:
                pool.states[runtime_id] = RuntimeState.WARM
                pool.warm.appendleft(runtime_id)
                self._serve(pool)

    async def _claim_cold(
        self,
        pool: Pool,
        runtime_id: str,
        bind: Bind,
        network: str,
        workspace_id: str,
        notify: Callable[[BuildState], Awaitable[None]] | None,
    ) -> Runtime:
        row = await self._provision(pool, runtime_id, network, workspace_id, "cold start for a claim", notify)

        def claim(session: Session) -> Runtime:
            fresh = session.get(Runtime, runtime_id)
            assert fresh is not None
            move(session, fresh, RuntimeState.CLAIMED, "claimed cold")
            fresh.claims = 1
            bind(session, fresh)
            return fresh

        try:
            row = await self._store.run(claim)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._destroy(pool, row, "the claim failed after its cold start")
            raise
        async with pool.lock:
            pool.states[runtime_id] = RuntimeState.CLAIMED
        return row

    # -- release and recycling ----------------------------------------------------------

    async def release(self, runtime_id: str, bind: Bind, reason: str) -> None:
        """End a claim: `bind` closes the owner's record; the runtime is recycled or destroyed."""
        row = await self._store.run(drain(runtime_id, bind, reason))
        if row is None:
            return
        pool = self._pool(row.template)
        async with pool.lock:
            pool.states[row.id] = RuntimeState.DRAINING
            pool.holders.pop(row.id, None)
            self._serve(pool)  # a claim of that workspace waiting on its share may go now
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
            await self._destroy(pool, row, _NEVER_REUSED)
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
            await self._destroy(pool, row, reason)
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
            self._serve(pool)
        self._publish()

    # -- provisioning and removal -------------------------------------------------------

    async def _provision(
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
                await self._destroy(pool, row, f"provisioning failed: {exc}")
            raise
        return row

    async def _fill(self, pool: Pool, runtime_id: str) -> None:
        """Background: provision one warm runtime, check it, and put it on the shelf."""
        try:
            await self._provisioner.wait_image(pool.template)
            row = await self._provision(pool, runtime_id, pool.network, None, "replenishing warm runtimes")
            assert row.container_id is not None
            left = await self._provisioner.leftovers(row.container_id, runtime_id, pool.template)
            if left:
                await self._destroy(pool, row, "failed its first probe: " + "; ".join(left[:3]))
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

    def _start_destroy(self, pool: Pool, runtime_id: str, reason: str) -> None:
        """Under the pool's lock: stop counting a runtime and remove it in the background."""
        pool.states[runtime_id] = RuntimeState.DESTROYING

        async def destroy() -> None:
            row = await self._store.get(Runtime, runtime_id)
            if row is not None:
                await self._destroy(pool, row, reason)

        self._spawn(destroy)

    async def _destroy(self, pool: Pool, row: Runtime, reason: str, *, final: str = RuntimeState.DESTROYED) -> None:
        """Remove a runtime's container and record why; its capacity goes to waiting claims."""
        async with pool.lock:
            if pool.states.get(row.id) not in (None, RuntimeState.DESTROYING):
                pool.states[row.id] = RuntimeState.DESTROYING
            if row.id in pool.warm:
                pool.warm.remove(row.id)
            self._serve(pool)

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
                self._serve(pool)
                self._replenish(pool)
        self._publish()

    # -- what the upkeep loops and start-up call --------------------------------------

    @property
    def pools(self) -> list[Pool]:
        return list(self._pools.values())

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
            await self._destroy(pool, row, reason)
        return True

    async def lose(self, pool: Pool, runtime_id: str, reason: str) -> None:
        """A claimed runtime's container died or vanished: its sandbox or computer is lost, its place freed."""

        def end(session: Session) -> None:
            for model in (Sandbox, Computer):
                stmt = select(model).where(model.runtime_id == runtime_id, model.status == SandboxStatus.RUNNING)
                for claim in session.exec(stmt).all():
                    claim.status, claim.ended_at, claim.end_reason = SandboxStatus.LOST, utcnow(), reason
                    session.add(claim)

        row = await self._store.get(Runtime, runtime_id)
        if row is None:
            return
        await self._store.run(end)
        await self._destroy(pool, row, reason, final=RuntimeState.LOST)

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

    def set_target(self, pool: Pool, target: int) -> None:
        pool.target = max(pool.shape.min, min(pool.shape.max, target))
        self._publish()

    def adopt(self, pool: Pool, row: Runtime) -> None:
        """Count a runtime that survived a restart (warm ones go back on the shelf)."""
        self._where[row.container_id or ""] = (pool, row.id)
        pool.states[row.id] = row.state
        if row.state == RuntimeState.CLAIMED and row.workspace_id:
            pool.holders[row.id] = row.workspace_id
        if row.state == RuntimeState.WARM:
            pool.warm.append(row.id)

    async def destroy(self, pool: Pool, row: Runtime, reason: str) -> None:
        await self._destroy(pool, row, reason)

    def recycle_later(self, pool: Pool, row: Runtime) -> None:
        self._spawn(self._recycle, pool, row)

    def pool_of(self, template: str) -> Pool:
        """The pool of a template, or a never-refilled one if the template left the config."""
        return self._pools.get(template) or self._adhoc(template)

    def is_configured(self, template: str) -> bool:
        return template in self._pools

    def pause_refills(self, paused: bool) -> None:
        """While start-up reconciliation counts the surviving runtimes, nothing is refilled."""
        self._reconciling = paused

    def _adhoc(self, template: str) -> Pool:
        """A pool for runtimes of a template no longer in the config: never refilled."""
        pool = self._pools_gone.setdefault(template, Pool(template, PoolShape(min=0, max=1), "none"))
        return pool

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Own the background work (fills, recycling, publishing) until cancelled."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._publisher)
            task_status.started()
            try:
                await anyio.sleep_forever()
            finally:
                self._tg = None

    # -- plumbing -----------------------------------------------------------------------

    def _pool(self, template: str) -> Pool:
        pool = self._pools.get(template)
        if pool is None:
            raise TemplateNotFoundError(template, list(self._pools))
        return pool

    def _spawn(self, fn: Callable[[*Ts], Coroutine[Any, Any, None]], *args: *Ts) -> None:
        if self._tg is None:
            raise NotRunningError("the pool manager")
        self._tg.start_soon(fn, *args)

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


def _held_by(workspace_id: str, bind: Bind) -> Bind:
    """`bind`, and the runtime's row records the workspace that holds it (its share, after a restart)."""

    def held(session: Session, row: Runtime) -> None:
        row.workspace_id = workspace_id
        session.add(row)
        bind(session, row)

    return held
