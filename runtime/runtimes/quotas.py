"""Concurrent-claim quotas: how many sandboxes and computers may run at once, per tenant,
workspace, user and run tree.

Each check runs twice: once early, so a refused call starts nothing, and again inside the
claim's own transaction, so the count and the new row are one atomic step and concurrent
creates cannot overshoot.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlmodel import Session, func, select

from dockyard.runtime.substrate.errors import QuotaExceededError
from dockyard.runtime.substrate.runs import tree_limit
from dockyard.runtime.substrate.settings import Identity, QuotaSettings
from dockyard.runtime.substrate.store import Computer, Sandbox, SandboxStatus

__all__ = ["computer_quota", "sandbox_quota"]


def sandbox_quota(quotas: QuotaSettings, who: Identity) -> Callable[[Session], None]:
    """A check that refuses one more sandbox past a concurrent-sandbox quota (tenant,
    workspace, user, and the run's tree: its own and every run it started)."""
    same_workspace = Sandbox.workspace_id == who.workspace_id
    limits = [
        ("tenant_sandboxes", quotas.tenant_sandboxes, None),
        ("workspace_sandboxes", quotas.workspace_sandboxes, same_workspace),
        ("user_sandboxes", quotas.user_sandboxes, same_workspace & (Sandbox.user_id == who.user_id)),
    ]
    return _both(
        _running_limits(Sandbox, limits, "sandboxes"),
        tree_limit(Sandbox, "run_sandboxes", quotas.run_sandboxes, who, "sandboxes"),
    )


def computer_quota(quotas: QuotaSettings, who: Identity) -> Callable[[Session], None]:
    """A check that refuses one more computer past a concurrent-computer quota (tenant,
    workspace, user, and the run's tree)."""
    same_workspace = Computer.workspace_id == who.workspace_id
    limits = [
        ("tenant_computers", quotas.tenant_computers, None),
        ("workspace_computers", quotas.workspace_computers, same_workspace),
        ("user_computers", quotas.user_computers, same_workspace & (Computer.user_id == who.user_id)),
    ]
    return _both(
        _running_limits(Computer, limits, "computers"),
        tree_limit(Computer, "run_computers", quotas.run_computers, who, "computers"),
    )


def _running_limits(model: Any, limits: list[tuple[str, int, Any]], noun: str) -> Callable[[Session], None]:
    """A check that refuses one more running `model` row (a sandbox, a computer) past any of
    `limits`: (quota name, limit or 0 for none, the rows it counts or None for all)."""

    def check(session: Session) -> None:
        for name, limit, where in limits:
            if not limit:
                continue
            stmt = select(func.count()).select_from(model).where(model.status == SandboxStatus.RUNNING)
            held = session.exec(stmt.where(where) if where is not None else stmt).one()
            if held >= limit:
                raise QuotaExceededError(
                    f"quota {name} reached: {held} of {limit} {noun} are running; destroy one "
                    "you no longer need, or ask the operator for a higher quota"
                )

    return check


def _both(first: Callable[[Session], None], second: Callable[[Session], None]) -> Callable[[Session], None]:
    def check(session: Session) -> None:
        first(session)
        second(session)

    return check
