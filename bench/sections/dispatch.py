"""dispatch: a trivial task from dispatch to its result, and the throughput of 100 dispatches.

Dispatch is not built yet, so both rows say so instead of showing a number. Each row becomes
one function here, `async def ...(run, options) -> Figure`, once the dispatch tools exist.
"""

from __future__ import annotations

from bench.figures import Figure
from bench.run import Options, Run

__all__ = ["measure"]

SECTION = "dispatch"
NOT_BUILT = "not available yet (dispatch is not built)"


async def measure(run: Run, options: Options) -> list[Figure]:
    """The dispatch rows, each a placeholder until its measurement is written."""
    return [
        Figure.unavailable(SECTION, "dispatch-to-result of a trivial task", NOT_BUILT),
        Figure.unavailable(SECTION, "throughput of 100 dispatches", NOT_BUILT),
    ]
