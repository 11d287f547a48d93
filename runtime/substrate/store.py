"""The store: SQLModel tables in one SQLite file (WAL), reached from async code via one thread.

Writes are serialised through a single-slot limiter, so SQLite never sees two writers and a
slow query never blocks the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum, nonmember
from pathlib import Path
from typing import Any, TypeVar

import anyio
from sqlalchemy import JSON, Column, event
from sqlalchemy.engine import Engine as SqlEngine
from sqlmodel import Field, Session, SQLModel, create_engine

from dockyard.runtime.substrate.errors import NotRunningError

__all__ = [
    "AuditEvent",
    "CallTask",
    "CallTaskStatus",
    "MemberStatus",
    "PlanStatus",
    "PoolEvent",
    "PoolState",
    "Runtime",
    "RuntimeState",
    "Sandbox",
    "SandboxStatus",
    "Snapshot",
    "Store",
    "TaskStatus",
    "TeamStatus",
    "utcnow",
]

T = TypeVar("T")


def utcnow() -> datetime:
    """Now, in UTC (stored times are always timezone-aware UTC)."""
    return datetime.now(UTC)


class RuntimeState(StrEnum):
    r"""Where a runtime (one container) is in its pool's lifecycle (stored as these strings).

    provisioning -> warm -> claimed -> draining -> warm        (recycled, verified clean)
                                               \-> destroying -> destroyed
    A runtime whose container vanished behind dockyard's back ends as lost.
    """

    PROVISIONING = "provisioning"
    WARM = "warm"
    CLAIMED = "claimed"
    DRAINING = "draining"
    DESTROYING = "destroying"
    DESTROYED = "destroyed"
    LOST = "lost"

    LIVE = nonmember((PROVISIONING, WARM, CLAIMED, DRAINING, DESTROYING))


class SandboxStatus(StrEnum):
    r"""A sandbox or a computer (one claim of a runtime) is running until destroyed, expired or
    lost (stored as these strings).

    running --destroy or ttl expired--> destroyed
       \-----container died or vanished--> lost
    """

    RUNNING = "running"
    DESTROYED = "destroyed"
    LOST = "lost"


class Runtime(SQLModel, table=True):
    """One container of a pool, with its lifecycle state; a claim binds it to a sandbox."""

    id: str = Field(primary_key=True)
    kind: str = "sandbox"
    template: str = Field(index=True)
    image: str
    container_id: str | None = None
    container_name: str
    state: str = Field(default=RuntimeState.PROVISIONING, index=True)
    network: str
    docker_network: str = "none"
    cpus: float
    memory_mb: int
    sandbox_id: str | None = None
    workspace_id: str | None = None  # who holds it while it is claimed (its pool share)
    claims: int = 0
    created_at: datetime = Field(default_factory=utcnow)
    state_at: datetime = Field(default_factory=utcnow)


class PoolEvent(SQLModel, table=True):
    """One lifecycle transition of a runtime, with the reason it happened."""

    id: int | None = Field(default=None, primary_key=True)
    ts: datetime = Field(default_factory=utcnow, index=True)
    template: str = Field(index=True)
    runtime_id: str = Field(index=True)
    from_state: str | None
    to_state: str
    reason: str = ""


class PoolState(SQLModel, table=True):
    """What a pool's manager wants and sees that the runtimes table does not say."""

    template: str = Field(primary_key=True)
    target: int
    queue_depth: int = 0
    updated_at: datetime = Field(default_factory=utcnow)


class Sandbox(SQLModel, table=True):
    """A sandbox: one workspace's claim of a runtime, from sandbox_create to its end."""

    id: str = Field(primary_key=True)
    runtime_id: str = Field(index=True)
    container_id: str
    template: str = Field(index=True)
    status: str = Field(default=SandboxStatus.RUNNING, index=True)
    network: str
    cpus: float
    memory_mb: int
    env: dict[str, str] = Field(default_factory=dict, sa_column=Column(JSON))
    workspace_id: str = Field(index=True)
    project_id: str
    user_id: str
    run_id: str | None = None
    token_id: str | None = None  # the token that created it (None: the operator or dockyard)
    from_snapshot: str | None = None
    served_warm: bool = False
    claim_ms: float = 0.0
    created_at: datetime = Field(default_factory=utcnow, index=True)
    expires_at: datetime | None = None
    ended_at: datetime | None = None
    end_reason: str | None = None


class Snapshot(SQLModel, table=True):
    """An archive of a sandbox's /workspace and home, restorable into a new sandbox."""

    id: str = Field(primary_key=True)
    sandbox_id: str
    template: str
    label: str | None = None
    workspace_id: str = Field(index=True)
    project_id: str
    user_id: str
    path: str
    size_bytes: int
    created_at: datetime = Field(default_factory=utcnow)


class Token(SQLModel, table=True):
    """A bearer token: only its hash is kept. Its attribution and scopes are what it may do."""

    id: str = Field(primary_key=True)
    secret_hash: str = Field(index=True, unique=True)
    scopes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    workspace_id: str = Field(index=True)
    project_id: str
    user_id: str
    run_id: str | None = None
    sandbox_id: str | None = Field(default=None, index=True)
    parent_id: str | None = Field(default=None, index=True)  # the token it was minted from
    label: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    revoked_reason: str | None = None


class DispatchStatus(StrEnum):
    r"""Where a dispatch is in its lifecycle (stored as these strings).

    queued -> running -> completed | failed | cancelled | interrupted
         \-> failed | cancelled          (its runtime never came, or its owner cancelled first)

    The moves, and the states each may start from, are in `dockyard.runtime.work.dispatch.states`.
    """

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    FINAL = nonmember(frozenset({"completed", "failed", "cancelled", "interrupted"}))


class Dispatch(SQLModel, table=True):
    """One task routed to a mode and a runner; durable from the moment `dispatch` returns."""

    id: str = Field(primary_key=True)
    mode: str
    requested_mode: str
    runner: str
    status: str = Field(default=DispatchStatus.QUEUED.value, index=True)
    rationale: str
    task_summary: str
    prompt: str | None = None
    caller_sandbox_id: str | None = None  # local mode: the caller's sandbox it runs in
    sandbox_id: str | None = None  # the sandbox the work ran in
    workspace_id: str = Field(index=True)
    project_id: str
    user_id: str
    run_id: str | None = None
    token_id: str | None = None  # the token that created it
    run_token_id: str | None = None  # the token dockyard minted for its run: the only proof dispatch_submit takes
    result: str | None = None
    submitted: bool = False  # the result came from the runner through dispatch_submit
    members: list[str] | None = Field(default=None, sa_column=Column(JSON))  # team modes: each member's prompt
    member_results: list[dict] | None = Field(default=None, sa_column=Column(JSON))
    error: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None


class CallTaskStatus(StrEnum):
    r"""Where a long tool call handed back as a task is (stored as these strings; the wire's
    task statuses of the MCP Tasks extension).

    working --the call returned--> completed       (its result, an error result included)
           \--the call raised-----> failed          (a protocol error, or a restart cut it short)
           \--tasks/cancel--------> cancelled

    A task that follows a dispatch (`dispatch_id` set) keeps `working` in its row: its state is
    read from the dispatch, so a restart shows what the dispatch says. The moves are in
    `dockyard.runtime.work.calltasks`.
    """

    WORKING = "working"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    FINAL = nonmember(frozenset({"completed", "failed", "cancelled"}))


class CallTask(SQLModel, table=True):
    """A tool call answered with a task handle: its unguessable id, the token it is bound to,
    and what the call returned (the wire's result or error) once it ended."""

    id: str = Field(primary_key=True)
    tool: str
    dispatch_id: str | None = Field(default=None, index=True)  # a dispatch's task: its state is the dispatch's
    status: str = Field(default=CallTaskStatus.WORKING.value, index=True)
    status_message: str | None = None
    result: dict | None = Field(default=None, sa_column=Column(JSON))  # the CallToolResult, as the wire has it
    error: dict | None = Field(default=None, sa_column=Column(JSON))  # a JSON-RPC error: code, message
    workspace_id: str = Field(index=True)
    project_id: str
    user_id: str
    token_id: str | None = None  # the token it is bound to (None: the local operator)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime


class RunLink(SQLModel, table=True):
    """A run and one run above it (the run that started it, that run's starter, and so on):
    a closure table, so a run's limits count its whole tree in one query."""

    __tablename__ = "run_links"

    run_id: str = Field(primary_key=True)
    ancestor_id: str = Field(primary_key=True, index=True)


class DispatchDecision(SQLModel, table=True):
    """Why a dispatch went where it went (or was refused): one row per `dispatch` call."""

    __tablename__ = "dispatch_decisions"

    id: int | None = Field(default=None, primary_key=True)
    dispatch_id: str | None = Field(default=None, index=True)
    requested_mode: str
    used_mode: str | None = None
    hint: str | None = None
    rationale: str
    task_summary: str
    pool: dict = Field(default_factory=dict, sa_column=Column(JSON))
    workspace_id: str = Field(index=True)
    project_id: str
    user_id: str
    run_id: str | None = None
    token_id: str | None = None
    outcome: str  # accepted | refused
    reason: str | None = None
    ts: datetime = Field(default_factory=utcnow)


class Computer(SQLModel, table=True):
    """A claimed computer: a browser runtime bound to its owner until destroyed or expired."""

    id: str = Field(primary_key=True)
    runtime_id: str = Field(index=True)
    container_id: str
    template: str
    width: int
    height: int
    status: str = Field(default=SandboxStatus.RUNNING, index=True)  # running, destroyed, lost
    served_warm: bool | None = None  # how the pool served the claim
    claim_ms: float | None = None
    workspace_id: str = Field(index=True)
    project_id: str
    user_id: str
    run_id: str | None = None
    token_id: str | None = None  # the token that created it
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None
    ended_at: datetime | None = None
    end_reason: str | None = None


class TeamStatus(StrEnum):
    """A team is active until its lead shuts it down (stored as these strings)."""

    ACTIVE = "active"
    SHUT_DOWN = "shut down"


class MemberStatus(StrEnum):
    """Where a member is in its loop of turns (stored as these strings)."""

    STARTING = "starting"  # its sandbox and token are being prepared
    BUSY = "busy"  # a turn is running
    IDLE = "idle"  # waiting for a message (woken at once when one arrives)
    READY = "ready"  # was busy when dockyard stopped; a message resumes it
    STOPPED = "stopped"  # shut down
    FAILED = "failed"  # could not start


class TaskStatus(StrEnum):
    """A task on a team's list: open, claimed by one member, then done or failed."""

    OPEN = "open"
    CLAIMED = "claimed"
    DONE = "done"
    FAILED = "failed"


class PlanStatus(StrEnum):
    """A plan-mode member's plan; a member that has proposed none has no plan status (None)."""

    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


class Team(SQLModel, table=True):
    """A named group of members with inboxes and a shared task list, led by its creator."""

    id: str = Field(primary_key=True)
    name: str
    workspace_id: str = Field(index=True)
    project_id: str
    user_id: str
    lead_token_id: str | None = None
    sandbox_id: str | None = None  # the sandbox members with isolation 'shared' work in
    # The column `interrupted` of stores from before is left unused: who a restart interrupted
    # is read from the members' states.
    status: str = TeamStatus.ACTIVE.value
    created_at: datetime = Field(default_factory=utcnow)


class Member(SQLModel, table=True):
    """A teammate: a runner with a role, its own token and a conversation of turns."""

    id: str = Field(primary_key=True)
    team_id: str = Field(index=True)
    role: str
    runner: str
    isolation: str  # shared: the team's sandbox; own: a sandbox of its own
    prompt: str
    status: str = MemberStatus.STARTING.value
    sandbox_id: str | None = None
    unix_user: str | None = None  # in a shared sandbox: its own Unix user there, assigned by the server
    token_id: str | None = None
    plan_mode: bool = False
    plan: str | None = None
    plan_status: str | None = None  # a PlanStatus (plan mode only)
    plan_feedback: str | None = None
    turns: int = 0
    last_output: str | None = None
    last_error: str | None = None
    conversation: list[dict] | None = Field(default=None, sa_column=Column(JSON))  # llm runner: its chat so far
    created_at: datetime = Field(default_factory=utcnow)


class Message(SQLModel, table=True):
    """One message in a recipient's inbox; `delivered_at` is the receipt its sender sees."""

    id: int | None = Field(default=None, primary_key=True)
    team_id: str = Field(index=True)
    sender: str  # a member id, or "lead"
    recipient: str = Field(index=True)  # a member id, or "lead"
    author_user_id: str | None = None  # who wrote it: the lead side's own user, or the member's team user
    author_token_id: str | None = None  # the token it was sent with
    kind: str = "message"  # message, broadcast, plan (a plan decision from the lead)
    body: str
    created_at: datetime = Field(default_factory=utcnow)
    taken_at: datetime | None = None  # handed to the recipient's turn
    delivered_at: datetime | None = None  # the recipient's turn that took it has finished


class TeamTask(SQLModel, table=True):
    """A task on a team's shared list: open, claimed by one member, then done or failed."""

    id: str = Field(primary_key=True)
    team_id: str = Field(index=True)
    title: str
    detail: str | None = None
    status: str = TaskStatus.OPEN.value
    owner: str | None = None  # the member who claimed it
    result: str | None = None
    created_by: str
    created_at: datetime = Field(default_factory=utcnow)
    claimed_at: datetime | None = None
    finished_at: datetime | None = None


class AuditEvent(SQLModel, table=True):
    """One action, allowed or not: who, what, on what, when, how it ended, how long it took.

    Rows are append-only and chained: `hash` covers the row and `prev_hash`, its predecessor's;
    `mac` binds `id` and `hash` under the audit key outside the store (None on rows from before it).
    """

    id: int | None = Field(default=None, primary_key=True)
    ts: datetime = Field(default_factory=utcnow, index=True)
    workspace_id: str = Field(index=True)
    project_id: str
    user_id: str = Field(index=True)
    run_id: str | None = None
    token_id: str | None = Field(default=None, index=True)  # the token presented; None: the local operator
    kind: str = Field(index=True)
    target: str | None = Field(default=None, index=True)
    outcome: str
    detail: str = "{}"
    duration_ms: float = 0.0
    prev_hash: str
    hash: str
    mac: str | None = None


@event.listens_for(SqlEngine, "connect")
def _sqlite_pragmas(dbapi_connection: Any, _record: object) -> None:
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives the server being killed (the WAL is written
        # before the call returns) and the file never corrupts; only a power loss may take the
        # last commits back. It saves an fsync on every state change and audit row.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=5000")
        cursor.close()


# Columns added to existing tables since the first release: (table, column, SQL type).
# create_all makes new tables but never alters old ones, so a store from before gets these.
_ADDED_COLUMNS = [
    ("auditevent", "token_id", "VARCHAR"),
    ("dispatch", "submitted", "BOOLEAN DEFAULT 0"),
    ("dispatch", "members", "JSON"),
    ("dispatch", "member_results", "JSON"),
    ("sandbox", "token_id", "VARCHAR"),
    ("computer", "token_id", "VARCHAR"),
    ("dispatch", "token_id", "VARCHAR"),
    ("dispatch", "run_token_id", "VARCHAR"),
    ("message", "author_user_id", "VARCHAR"),
    ("message", "author_token_id", "VARCHAR"),
    ("member", "unix_user", "VARCHAR"),
    ("runtime", "workspace_id", "VARCHAR"),
    ("auditevent", "mac", "VARCHAR"),
]


def _add_missing_columns(engine: SqlEngine) -> None:
    with engine.begin() as connection:
        for table, column, sql_type in _ADDED_COLUMNS:
            present = {row[1] for row in connection.exec_driver_sql(f"PRAGMA table_info({table})")}
            if column not in present:
                connection.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {sql_type}")


class Store:
    """Owns the database engine; `run(fn)` calls `fn(session)` in the store's thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._engine: SqlEngine | None = None
        self._limiter = anyio.CapacityLimiter(1)

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def open_() -> SqlEngine:
            engine = create_engine(f"sqlite:///{self.path}", connect_args={"check_same_thread": False})
            SQLModel.metadata.create_all(engine)
            _add_missing_columns(engine)
            return engine

        self._engine = await anyio.to_thread.run_sync(open_, limiter=self._limiter)

    async def close(self) -> None:
        if self._engine is not None:
            await anyio.to_thread.run_sync(self._engine.dispose, limiter=self._limiter)
            self._engine = None

    async def run(self, fn: Callable[[Session], T], *, then: Callable[[T], object] | None = None) -> T:
        """Run `fn` in one transaction; it commits if `fn` returns, rolls back if it raises.

        `then`, if given, is called with the result in the same worker thread once the commit
        succeeded (one thread hop for a write and what must follow it).
        """
        engine = self._engine
        if engine is None:
            raise NotRunningError("the store")

        def call() -> T:
            with Session(engine, expire_on_commit=False) as session, session.begin():
                result = fn(session)
            if then is not None:
                then(result)
            return result

        with anyio.CancelScope(shield=True):  # a started write always finishes
            result = await anyio.to_thread.run_sync(call, limiter=self._limiter)
        return result

    async def get(self, model: type[T], key: object) -> T | None:
        return await self.run(lambda s: s.get(model, key))

    async def update(self, model: type[T], key: object, **values: object) -> T | None:
        """Set `values` on one row in one transaction; returns it, or None if there is none."""

        def update(session: Session) -> T | None:
            row = session.get(model, key)
            if row is not None:
                for name, value in values.items():
                    setattr(row, name, value)
                session.add(row)
            return row

        return await self.run(update)

    async def add(self, row: T) -> T:
        def add(session: Session) -> T:
            session.add(row)
            return row

        return await self.run(add)
