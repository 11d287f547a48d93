"""Runs and the runs they start, so that a run's limits count its whole tree.

A run is a dispatch's runner (run id: the dispatch id), a team member (its member id) or a
team's shared sandbox (the team id). A dispatch, member or team created by a caller acting for
a run is that run's child. Each child's lineage is written as `RunLink` rows (the child and
every run above it) in the same transaction as the child's own row, so the tree is a fact of
the store before the child can hold anything.

`run_sandboxes` and `run_computers` then count every running sandbox or computer of a run and
of all runs below it, checked for the caller's run and each run above it inside the claim's
transaction: an orchestrator with a limit of four holds four across its tree, not four per
child.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlmodel import Session, col, func, select

from dockyard.runtime.substrate.errors import QuotaExceededError
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import Computer, RunLink, Sandbox, SandboxStatus

__all__ = ["ancestors", "link_run", "tree_limit"]


def ancestors(session: Session, run_id: str) -> list[str]:
    """Every run above `run_id`: the one that started it, that one's starter, and so on."""
    return list(session.exec(select(RunLink.ancestor_id).where(RunLink.run_id == run_id)).all())


def link_run(session: Session, run_id: str, parent_run_id: str | None) -> None:
    """Record that `run_id` was started by `parent_run_id` (nothing, for a caller with no run)."""
    if parent_run_id is None or parent_run_id == run_id:
        return
    for ancestor in dict.fromkeys([parent_run_id, *ancestors(session, parent_run_id)]):
        if ancestor != run_id:
            session.add(RunLink(run_id=run_id, ancestor_id=ancestor))


def tree_limit(
    model: type[Sandbox] | type[Computer], name: str, limit: int, who: Identity, noun: str
) -> Callable[[Session], None]:
    """A check that refuses one more running `model` row (a sandbox, a computer) for `who` when
    its run, or any run above it, already holds `limit` of them across its tree."""

    def check(session: Session) -> None:
        if not limit or who.run_id is None:
            return
        for run in [who.run_id, *ancestors(session, who.run_id)]:
            below = select(RunLink.run_id).where(RunLink.ancestor_id == run)
            held = session.exec(
                select(func.count())
                .select_from(model)
                .where(
                    model.status == SandboxStatus.RUNNING,
                    model.workspace_id == who.workspace_id,
                    (col(model.run_id) == run) | col(model.run_id).in_(below),
                )
            ).one()
            if held >= limit:
                raise QuotaExceededError(
                    f"quota {name} reached: {held} of {limit} {noun} are running in run '{run}' and the runs it "
                    "started; destroy one you no longer need, let a child run finish, or ask the operator for a "
                    "higher quota"
                )

    return check
