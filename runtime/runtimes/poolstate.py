"""The pool's records: a template's pool as the manager tracks it, grants, leases, transitions."""

from __future__ import annotations

import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio
from sqlmodel import Session, col, update

from dockyard.runtime.runtimes.waitqueue import FairQueue
from dockyard.runtime.substrate.settings import PoolShape
from dockyard.runtime.substrate.store import Computer, PoolEvent, Runtime, RuntimeState, Sandbox, utcnow

__all__ = [
    "Bind",
    "Grant",
    "Lease",
    "Pool",
    "claim_warm",
    "drain",
    "move",
    "new_runtime_id",
    "timed_bind",
    "transition",
]

_COUNTED = (RuntimeState.PROVISIONING, RuntimeState.WARM, RuntimeState.CLAIMED, RuntimeState.DRAINING)


Bind = Callable[[Session, Runtime], None]
"""Called inside a claim's or release's transaction to write the owner's side of it."""


@dataclass(frozen=True)
class Grant:
    """A claim's turn: an existing warm runtime, or room to cold-start a new one."""

    runtime_id: str
    warm: bool


@dataclass(frozen=True)
class Lease:
    """A claimed runtime and how the claim went."""

    runtime: Runtime
    warm: bool
    claim_ms: float


class Pool:
    """One template's pool as the manager sees it: states, warm order, queue and target."""

    def __init__(self, template: str, shape: PoolShape, network: str) -> None:
        self.template = template
        self.shape = shape
        self.network = network
        self.target = shape.min
        self.lock = anyio.Lock()
        self.states: dict[str, str] = {}
        self.warm: deque[str] = deque()
        self.filling: set[str] = set()
        self.holders: dict[str, str] = {}  # runtime id -> the workspace it is granted to or claimed by
        self.queue: FairQueue[Grant] = FairQueue()
        self.misses = 0
        self.last_busy = time.monotonic()
        self.fill_after = 0.0

    def count(self, *states: str) -> int:
        return sum(1 for state in self.states.values() if state in states)

    def held(self, workspace_id: str) -> int:
        """How many of this pool's runtimes a workspace holds (claimed, or granted and on the way)."""
        return sum(1 for holder in self.holders.values() if holder == workspace_id)

    @property
    def total(self) -> int:
        return self.count(*_COUNTED)

    @property
    def prewarms(self) -> bool:
        """A networked runtime is on its owner's workspace's own bridge, so it starts for its owner:
        such pools are not pre-warmed."""
        return self.network == "none"


def new_runtime_id() -> str:
    return f"rt_{secrets.token_hex(8)}"


def move(session: Session, row: Runtime, to: str, reason: str) -> None:
    session.add(PoolEvent(template=row.template, runtime_id=row.id, from_state=row.state, to_state=to, reason=reason))
    row.state, row.state_at = to, utcnow()
    session.add(row)


def transition(runtime_id: str, to: str, reason: str, *, only_from: tuple[str, ...]) -> Callable[[Session], None]:
    """A store step that moves a runtime to `to`, if it is still in one of `only_from`."""

    def write(session: Session) -> None:
        row = session.get(Runtime, runtime_id)
        if row is not None and row.state in only_from:
            move(session, row, to, reason)

    return write


def claim_warm(runtime_id: str, bind: Bind) -> Callable[[Session], Runtime | None]:
    """A store step that claims a warm runtime for the owner `bind` writes; None (and nothing
    written) if it is no longer warm."""

    def take(session: Session) -> Runtime | None:
        # The conditional update is the claim: it succeeds for exactly one claimer.
        taken = session.exec(
            update(Runtime)
            .where(col(Runtime.id) == runtime_id, col(Runtime.state) == RuntimeState.WARM)
            .values(state=RuntimeState.CLAIMED, state_at=utcnow(), claims=Runtime.claims + 1)
        )
        if taken.rowcount != 1:
            return None
        row = session.get(Runtime, runtime_id)  # a fresh session: loaded after the update
        assert row is not None
        session.add(
            PoolEvent(
                template=row.template,
                runtime_id=row.id,
                from_state=RuntimeState.WARM,
                to_state=RuntimeState.CLAIMED,
                reason="claimed warm",
            )
        )
        bind(session, row)
        return row

    return take


def drain(runtime_id: str, bind: Bind, reason: str) -> Callable[[Session], Runtime | None]:
    """A store step that ends a claim: the runtime drains, owned by nobody, and `bind` closes
    the owner's record; None (and nothing written) if it is not claimed."""

    def write(session: Session) -> Runtime | None:
        row = session.get(Runtime, runtime_id)
        if row is None or row.state != RuntimeState.CLAIMED:
            return None
        move(session, row, RuntimeState.DRAINING, reason)
        row.sandbox_id = row.workspace_id = None
        bind(session, row)
        return row

    return write


def timed_bind(bind: Bind, started: float, warm: bool) -> Bind:
    """`bind`, then note on the owner's row (a sandbox or a computer) how the claim was served
    and how long it took."""

    def timed(session: Session, row: Runtime) -> None:
        bind(session, row)
        for model in (Sandbox, Computer):
            claim = session.get(model, row.sandbox_id) if row.sandbox_id else None
            if claim is not None:
                claim.served_warm, claim.claim_ms = warm, round((time.perf_counter() - started) * 1000, 3)
                session.add(claim)

    return timed
