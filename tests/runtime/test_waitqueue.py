"""The pool's wait queue on its own (no Docker): workspaces in turn, first come first served
inside each, and a workspace at its share passed over without losing its place."""

from __future__ import annotations

from dockyard.runtime.waitqueue import FairQueue


def drain(queue: FairQueue[str], eligible=lambda _: True) -> list[str]:
    served = []
    while (waiter := queue.peek(eligible)) is not None:
        queue.take(waiter)
        served.append(waiter.workspace_id)
    return served


def test_workspaces_take_turns_and_each_keeps_its_own_order() -> None:
    queue: FairQueue[str] = FairQueue()
    waiters = [queue.push(ws) for ws in ("a", "a", "a", "b", "c", "b")]
    order = []
    while (waiter := queue.peek()) is not None:
        queue.take(waiter)
        order.append(waiters.index(waiter))
    assert order == [0, 3, 4, 1, 5, 2]


def test_a_workspace_at_its_share_is_passed_over_and_served_first_once_it_has_room() -> None:
    queue: FairQueue[str] = FairQueue()
    for ws in ("a", "a", "b", "a", "c"):
        queue.push(ws)
    assert drain(queue, lambda ws: ws != "a") == ["b", "c"]
    assert len(queue) == 3
    assert drain(queue) == ["a", "a", "a"]


def test_a_waiter_that_gives_up_leaves_no_trace() -> None:
    queue: FairQueue[str] = FairQueue()
    first, second = queue.push("a"), queue.push("b")
    assert queue.remove(first) and not queue.remove(first)
    assert queue.peek() is second and len(queue) == 1
