"""Turns in a pool's fair queue: which waiting claim is served next, and with what.

Everything here runs under the pool's lock and only changes the pool's in-memory record: a
claim is granted a warm runtime if one fits, else room to cold-start one while the pool is
below `max`, else it waits. A workspace that holds its share is passed over until it gives
one back.
"""

from __future__ import annotations

from collections.abc import Callable

from dockyard.runtime.runtimes.poolstate import Grant, Pool, new_runtime_id
from dockyard.runtime.runtimes.waitqueue import Waiter
from dockyard.runtime.substrate.store import RuntimeState

__all__ = ["MakeRoom", "serve"]

MakeRoom = Callable[[Pool, str, str], None]
"""Under the pool's lock: stop counting a runtime (pool, runtime id, reason) and remove it."""


def serve(pool: Pool, share: int, make_room: MakeRoom) -> None:
    """Give queued claims their turns while there is capacity, passing over workspaces that
    hold `share` of the pool; `make_room` removes an idle warm runtime a claim must replace."""
    while (waiter := pool.queue.peek(lambda workspace_id: pool.held(workspace_id) < share)) is not None:
        grant = _grant(pool, waiter, make_room)
        if grant is None:
            return
        pool.queue.take(waiter)
        waiter.grant = grant
        waiter.granted.set()


def _grant(pool: Pool, waiter: Waiter[Grant], make_room: MakeRoom) -> Grant | None:
    """A warm runtime if one fits, else room for a cold start, else None; what is granted
    counts toward the waiter's workspace's share from now on."""
    grant = _room(pool, waiter.needs_cold, make_room)
    if grant is not None:
        pool.holders[grant.runtime_id] = waiter.workspace_id
    return grant


def _room(pool: Pool, needs_cold: bool, make_room: MakeRoom) -> Grant | None:
    if not needs_cold and pool.warm:
        runtime_id = pool.warm.popleft()
        pool.states[runtime_id] = RuntimeState.CLAIMED
        return Grant(runtime_id, warm=True)
    if needs_cold and pool.total >= pool.shape.max and pool.warm:
        # An idle warm runtime of the wrong network gives its place to this claim.
        make_room(pool, pool.warm.pop(), "made room for a claim with another network")
    if pool.total < pool.shape.max:
        runtime_id = new_runtime_id()
        pool.states[runtime_id] = RuntimeState.PROVISIONING
        return Grant(runtime_id, warm=False)
    return None
