"""The queue of claims waiting on a full pool: first come, first served within a workspace,
and workspaces served in turn, so one busy workspace cannot starve the others."""

from __future__ import annotations

from collections import OrderedDict, deque
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

    def peek(self) -> Waiter[G] | None:
        """The waiter `pop` would return, left in place."""
        return next(iter(self._lanes.values()))[0] if self._lanes else None

    def pop(self) -> Waiter[G] | None:
        """The next waiter: the head of the workspace whose turn it is (that lane moves last)."""
        if not self._lanes:
            return None
        workspace_id, lane = next(iter(self._lanes.items()))
        waiter = lane.popleft()
        del self._lanes[workspace_id]
        if lane:
            self._lanes[workspace_id] = lane
        return waiter

    def remove(self, waiter: Waiter[G]) -> bool:
        """Take a waiter out (it gave up); False if it was no longer queued."""
        lane = self._lanes.get(waiter.workspace_id)
        if lane is None or waiter not in lane:
            return False
        lane.remove(waiter)
        if not lane:
            del self._lanes[waiter.workspace_id]
        return True
