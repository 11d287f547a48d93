"""The harness's sections, in the order they run and print; each returns its figures."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bench.figures import Figure
from bench.run import Options, Run
from bench.sections import claims, computers, dispatch, memory, noop, progress, sandbox_exec, snapshot, toollist

__all__ = ["SECTIONS", "Section"]

Section = Callable[[Run, Options], Awaitable[list[Figure]]]

SECTIONS: dict[str, Section] = {
    "tools": toollist.measure,
    "noop": noop.measure,
    "exec": sandbox_exec.measure,
    "progress": progress.measure,
    "claims": claims.measure,
    "dispatch": dispatch.measure,
    "computers": computers.measure,
    "snapshot": snapshot.measure,
    "memory": memory.measure,
}
