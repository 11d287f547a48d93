"""Claims on a pool: a turn in the fair queue, then a warm runtime taken or a cold one started.

A claim joins its pool's queue and is served at once if its turn and the pool's room allow
(`poolturns`); otherwise it waits until a runtime is released or the claim times out, and a
waiter cancelled meanwhile hands back what it was granted. The claim itself is one conditional
update in the store, with the new owner's row written in the same transaction (`poolstate`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio
from sqlmodel import Session

from dockyard.runtime.runtimes.images import BuildState
from dockyard.runtime.runtimes.poollifecycle import PoolLifecycle
from dockyard.runtime.runtimes.poolstate import Bind, Grant, Lease, Pool, claim_warm, move, timed_bind
from dockyard.runtime.runtimes.waitqueue import Waiter
from dockyard.runtime.substrate.errors import CapacityError, PoolExhaustedError, QuotaExceededError
from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import Runtime, RuntimeState, Store

__all__ = ["PoolClaims"]


class PoolClaims:
    """Hands runtimes to new owners, fairly between workspaces and within each one's share."""

    def __init__(self, settings: Settings, store: Store, life: PoolLifecycle, publish: Callable[[], None]) -> None:
        self._settings = settings.pool
        self._quotas = settings.quotas
        self._store = store
        self._life = life
        self._publish = publish

    async def claim(
        self,
        pool: Pool,
        workspace_id: str,
        bind: Bind,
        *,
        network: str,
        timeout_s: float | None = None,
        notify: Callable[[BuildState], Awaitable[None]] | None = None,
    ) -> Lease:
        """Hand one runtime of `pool` to a new owner; `bind` records the owner in the same transaction."""
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
            # The runtime is the new owner's from here on: a cancel must not land before the
            # caller holds its lease, or nobody would give it back.
            with anyio.CancelScope(shield=True):
                await self._life.replenish(pool)
            return Lease(row, grant.warm, (time.perf_counter() - started) * 1000)

    async def _turn(self, pool: Pool, workspace_id: str, needs_cold: bool, deadline: float) -> Grant:
        async with pool.lock:
            # Every claim joins the queue and is served at once if its turn and room allow it.
            waiter: Waiter[Grant] = pool.queue.push(workspace_id, needs_cold=needs_cold)
            self._life.serve(pool)
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
            self._life.serve(pool)
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
                self._life.serve(pool)

    async def _claim_cold(
        self,
        pool: Pool,
        runtime_id: str,
        bind: Bind,
        network: str,
        workspace_id: str,
        notify: Callable[[BuildState], Awaitable[None]] | None,
    ) -> Runtime:
        row = await self._life.provision(pool, runtime_id, network, workspace_id, "cold start for a claim", notify)

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
                await self._life.destroy(pool, row, "the claim failed after its cold start")
            raise
        async with pool.lock:
            pool.states[runtime_id] = RuntimeState.CLAIMED
        return row


def _held_by(workspace_id: str, bind: Bind) -> Bind:
    """`bind`, and the runtime's row records the workspace that holds it (its share, after a restart)."""

    def held(session: Session, row: Runtime) -> None:
        row.workspace_id = workspace_id
        session.add(row)
        bind(session, row)

    return held
