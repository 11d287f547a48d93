"""The event loop's exception handler, with one known-harmless report of anyio's left out.

anyio's UNIX socket streams wait for readability with `loop.add_reader(sock, future.set_result,
None)` and unregister the reader from the future's done callback, which runs one loop turn later.
When a receive is cancelled in the very turn the socket became readable, the reader still fires
and calls `set_result` on the cancelled future: asyncio reports an `InvalidStateError` "in
callback". Nothing is lost (the cancelled receive read nothing; the bytes stay in the socket for
the next receive), but the report reaches the loop's exception handler, and every cancelled read
of a supervisor link, a bridge session or a DevTools relay can raise it. This handler drops
exactly that report and passes every other one on unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["without_cancelled_reader_reports"]


def _is_cancelled_reader_report(context: dict[str, Any]) -> bool:
    """True for a reader or writer callback that tried to complete a future already cancelled."""
    if not isinstance(context.get("exception"), asyncio.InvalidStateError):
        return False
    callback = getattr(context.get("handle"), "_callback", None)
    future = getattr(callback, "__self__", None)
    return (
        isinstance(future, asyncio.Future)
        and getattr(callback, "__name__", "") in ("set_result", "set_exception")
        and future.cancelled()
    )


@contextmanager
def without_cancelled_reader_reports() -> Iterator[None]:
    """While open, the running asyncio loop ignores anyio's cancelled-reader report."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not on asyncio: the race is asyncio's alone
        yield
        return
    previous = loop.get_exception_handler()

    def handler(running: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if _is_cancelled_reader_report(context):
            return
        if previous is None:
            running.default_exception_handler(context)
        else:
            previous(running, context)

    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        if loop.get_exception_handler() is handler:
            loop.set_exception_handler(previous)
