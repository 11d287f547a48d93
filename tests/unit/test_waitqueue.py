"""The pool's wait queue on its own (no Docker): workspaces in turn, first come first served
inside each, and a workspace at its share passed over without losing its place."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dockyard.runtime.runtimes.waitqueue import FairQueue, Waiter

arrivals = st.lists(st.sampled_from("abcd"), max_size=30)


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


def serve_all(queue: FairQueue[str], eligible=lambda _: True) -> list[Waiter[str]]:
    served = []
    while (waiter := queue.peek(eligible)) is not None:
        queue.take(waiter)
        served.append(waiter)
    return served


@settings(max_examples=60, deadline=None)
@given(workspaces=arrivals)
def test_every_waiter_is_served_once_and_each_workspace_in_its_own_order(workspaces: list[str]) -> None:
    queue: FairQueue[str] = FairQueue()
    pushed = [queue.push(ws) for ws in workspaces]
    served = serve_all(queue)
    assert sorted(map(id, served)) == sorted(map(id, pushed)) and len(queue) == 0
    for ws in set(workspaces):
        assert [w for w in served if w.workspace_id == ws] == [w for w in pushed if w.workspace_id == ws]


@settings(max_examples=60, deadline=None)
@given(workspaces=arrivals)
def test_no_workspace_is_served_twice_while_another_with_waiters_waits_for_its_first(workspaces: list[str]) -> None:
    """Round robin: at every point, two workspaces that both still wait have been served
    equally often, give or take one."""
    queue: FairQueue[str] = FairQueue()
    for ws in workspaces:
        queue.push(ws)
    left = {ws: workspaces.count(ws) for ws in set(workspaces)}
    served = dict.fromkeys(left, 0)
    for waiter in serve_all(queue):
        served[waiter.workspace_id] += 1
        left[waiter.workspace_id] -= 1
        waiting = [ws for ws, n in left.items() if n > 0]
        assert all(abs(served[a] - served[b]) <= 1 for a in waiting for b in waiting), served


@settings(max_examples=60, deadline=None)
@given(workspaces=arrivals, gone=st.sets(st.integers(0, 29)), barred=st.sets(st.sampled_from("abcd")))
def test_waiters_that_gave_up_are_never_served_and_barred_workspaces_wait_in_place(
    workspaces: list[str], gone: set[int], barred: set[str]
) -> None:
    queue: FairQueue[str] = FairQueue()
    pushed = [queue.push(ws) for ws in workspaces]
    for index in sorted(gone):
        if index < len(pushed):
            assert queue.remove(pushed[index])
            assert not queue.remove(pushed[index])  # a second give-up finds nothing
    staying = [w for i, w in enumerate(pushed) if i not in gone]
    first = serve_all(queue, lambda ws: ws not in barred)
    assert all(w.workspace_id not in barred for w in first)
    assert len(queue) == sum(1 for w in staying if w.workspace_id in barred)
    rest = serve_all(queue)
    assert sorted(map(id, first + rest)) == sorted(map(id, staying))
    for ws in barred:
        assert [w for w in rest if w.workspace_id == ws] == [w for w in staying if w.workspace_id == ws]
