"""The queue of claims waiting on a pool: first come, first served within a workspace, and
workspaces served in turn, so one busy workspace cannot starve the others. A workspace that
holds its share of the pool is passed over until it gives one back."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import anyio

__all__ = ["FairQueue", "Waiter"]

G = TypeVar("G")


@dataclass(eq=False)
class Waiter(Generic[G]):
    """One waiting claim; `grant` is set (and `granted` fired) when it is its turn."""

    workspace_id: str
    needs_cold: bool = False
    granted: anyio.Event = field(default_factory=anyio.Event)
    grant: G | None = None


class FairQueue(Generic[G]):
    """Round-robin over workspaces, FIFO inside each."""

    def __init__(self) -> None:
        self._lanes: OrderedDict[str, deque[Waiter[G]]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes.values())

    def push(self, workspace_id: str, *, needs_cold: bool = False) -> Waiter[G]:
        waiter: Waiter[G] = Waiter(workspace_id, needs_cold)
        self._lanes.setdefault(workspace_id, deque()).append(waiter)
        return waiter

    def peek(self, eligible: Callable[[str], bool] = lambda _: True) -> Waiter[G] | None:
        """The next waiter to serve, left in place: the head of the first workspace in turn
        order that is `eligible` (one at its share of the pool is not)."""
        for workspace_id, lane in self._lanes.items():
            if eligible(workspace_id):
                return lane[0]
        return None

    def take(self, waiter: Waiter[G]) -> None:
        """Serve the head of a lane (as `peek` found it): that workspace's lane moves last."""
        lane = self._lanes.pop(waiter.workspace_id)
        assert lane[0] is waiter, "only the head of a lane is served"
        lane.popleft()
        if lane:
            self._lanes[waiter.workspace_id] = lane

    def remove(self, waiter: Waiter[G]) -> bool:
        """Take a waiter out (it gave up); False if it was no longer queued."""
        lane = self._lanes.get(waiter.workspace_id)
        if lane is None or waiter not in lane:
            return False
        lane.remove(waiter)
        if not lane:
            del self._lanes[waiter.workspace_id]
        return True
