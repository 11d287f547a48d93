"""The pool's turns on their own (no Docker): which waiting claim is served, with a warm
runtime or room for a cold start, and what a workspace at its share has to wait for."""

from __future__ import annotations

from dockyard.runtime.runtimes.poolstate import Grant, Pool
from dockyard.runtime.runtimes.poolturns import serve
from dockyard.runtime.runtimes.waitqueue import Waiter
from dockyard.runtime.substrate.settings import PoolShape
from dockyard.runtime.substrate.store import RuntimeState


def _pool(*, warm: int = 0, max: int = 4) -> Pool:
    pool = Pool("python", PoolShape(min=0, max=max), "none")
    for n in range(warm):
        pool.states[f"rt_warm{n}"] = RuntimeState.WARM
        pool.warm.append(f"rt_warm{n}")
    return pool


def _no_room_needed(pool: Pool, runtime_id: str, reason: str) -> None:
    raise AssertionError(f"{runtime_id} was removed to make room: {reason}")


def test_a_waiting_claim_takes_the_oldest_warm_runtime_and_it_counts_toward_its_workspace() -> None:
    pool = _pool(warm=2)
    waiter: Waiter[Grant] = pool.queue.push("ws_a")
    serve(pool, 2, _no_room_needed)
    assert waiter.grant == Grant("rt_warm0", warm=True)
    assert waiter.granted.is_set()
    assert pool.states["rt_warm0"] == RuntimeState.CLAIMED
    assert list(pool.warm) == ["rt_warm1"]
    assert pool.held("ws_a") == 1
    assert len(pool.queue) == 0


def test_with_no_warm_runtime_a_claim_gets_room_for_a_cold_start_below_max() -> None:
    pool = _pool(max=1)
    first: Waiter[Grant] = pool.queue.push("ws_a")
    second: Waiter[Grant] = pool.queue.push("ws_b")
    serve(pool, 1, _no_room_needed)
    assert first.grant is not None and not first.grant.warm
    assert pool.states[first.grant.runtime_id] == RuntimeState.PROVISIONING
    assert second.grant is None and not second.granted.is_set()
    assert len(pool.queue) == 1


def test_a_workspace_at_its_share_is_passed_over_while_another_workspace_is_served() -> None:
    pool = _pool(warm=3)
    pool.holders["rt_held"] = "ws_a"
    held_back: Waiter[Grant] = pool.queue.push("ws_a")
    other: Waiter[Grant] = pool.queue.push("ws_b")
    serve(pool, 1, _no_room_needed)
    assert held_back.grant is None
    assert other.grant == Grant("rt_warm0", warm=True)
    pool.holders.pop("rt_held")  # ws_a gives its runtime back
    serve(pool, 1, _no_room_needed)
    assert held_back.grant == Grant("rt_warm1", warm=True)


def test_a_claim_that_needs_a_cold_start_in_a_full_pool_takes_the_place_of_an_idle_warm_runtime() -> None:
    pool = _pool(warm=2, max=2)
    removed: list[tuple[str, str]] = []

    def make_room(pool: Pool, runtime_id: str, reason: str) -> None:
        pool.states[runtime_id] = RuntimeState.DESTROYING
        removed.append((runtime_id, reason))

    waiter: Waiter[Grant] = pool.queue.push("ws_a", needs_cold=True)
    serve(pool, 2, make_room)
    assert removed == [("rt_warm1", "made room for a claim with another network")]
    assert waiter.grant is not None and not waiter.grant.warm
    assert list(pool.warm) == ["rt_warm0"]


def test_nothing_is_granted_while_the_pool_is_full_and_nothing_warm_fits() -> None:
    pool = _pool(max=1)
    pool.states["rt_busy"] = RuntimeState.CLAIMED
    waiter: Waiter[Grant] = pool.queue.push("ws_a")
    serve(pool, 1, _no_room_needed)
    assert waiter.grant is None
    assert len(pool.queue) == 1
