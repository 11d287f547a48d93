"""Results that fit a budget: an exec's output cut to its head and tail, and the full outputs
kept per sandbox so a caller can read them as resources.

A sandbox's outputs are numbered by the server (1, 2, ...) in the order its commands ended;
the newest `kept` stay, in memory, and go when the sandbox ends (or the server stops).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Literal

from dockyard.runtime.substrate.models import ExecResult

__all__ = ["EXEC_OUTPUT_URI", "ExecOutputs", "Stream", "fit_exec", "head_tail", "json_chars"]

Stream = Literal["stdout", "stderr"]
EXEC_OUTPUT_URI = "dockyard://sandboxes/{sandbox_id}/execs/{n}/{stream}"
_ENDS = ("stdout", "stderr")


def json_chars(text: str) -> int:
    """What `text` costs in a JSON result: its characters with their escapes (a newline is two)."""
    return len(json.dumps(text, ensure_ascii=False)) - 2


def head_tail(text: str, limit: int, where: str | None = None) -> tuple[str, int]:
    """`text` within `limit` characters as JSON counts them: its head and its tail around a
    marker that says how many bytes were left out (and `where` the whole is); returns the text
    and the bytes omitted."""
    if json_chars(text) <= limit:
        return text, 0
    note = f" (all of it: {where})" if where else ""
    # the marker's own length comes out of the limit, so the whole stays within it
    room = max(limit - len(note) - 40, 0) * len(text) // json_chars(text)
    while True:
        head, tail = text[: room - room // 2], text[len(text) - room // 2 :] if room // 2 else ""
        omitted = len(text.encode("utf-8", errors="surrogatepass")) - len(
            (head + tail).encode("utf-8", errors="surrogatepass")
        )
        cut = f"{head}\n... {omitted} bytes omitted{note} ...\n{tail}"
        if json_chars(cut) <= limit or room == 0:
            return cut, omitted
        room = room * 9 // 10


def fit_exec(result: ExecResult, budget_chars: int, sandbox_id: str, n: int) -> ExecResult:
    """The result with stdout and stderr cut to share `budget_chars` (a stream that needs less
    leaves the rest to the other), each cut stream linked to its full output."""
    half = budget_chars // 2
    sizes = {"stdout": len(result.stdout), "stderr": len(result.stderr)}
    limits = {
        "stdout": max(half, budget_chars - min(sizes["stderr"], half)),
        "stderr": max(half, budget_chars - min(sizes["stdout"], half)),
    }
    fields: dict[str, object] = {"exec_n": n}
    for name in _ENDS:
        uri = EXEC_OUTPUT_URI.format(sandbox_id=sandbox_id, n=n, stream=name)
        text, omitted = head_tail(getattr(result, name), limits[name], uri)
        fields[name] = text
        if omitted:
            fields[f"{name}_uri"] = uri
    return result.model_copy(update=fields)


class ExecOutputs:
    """The newest full outputs of each sandbox's commands, numbered per sandbox."""

    def __init__(self, kept: int) -> None:
        self._kept = kept
        self._outputs: dict[str, OrderedDict[int, tuple[str, str]]] = {}
        self._last: dict[str, int] = {}

    def keep(self, sandbox_id: str, stdout: str, stderr: str) -> int:
        """Keep one command's output; returns its number in the sandbox (the oldest beyond `kept` goes)."""
        n = self._last.get(sandbox_id, 0) + 1
        self._last[sandbox_id] = n
        outputs = self._outputs.setdefault(sandbox_id, OrderedDict())
        outputs[n] = (stdout, stderr)
        while len(outputs) > self._kept:
            outputs.popitem(last=False)
        return n

    def get(self, sandbox_id: str, n: int, stream: Stream) -> str | None:
        """One stream of a kept output, or None if it was never kept or is gone."""
        outputs = self._outputs.get(sandbox_id)
        found = outputs.get(n) if outputs is not None else None
        return None if found is None else found[_ENDS.index(stream)]

    def forget(self, sandbox_id: str) -> None:
        """Drop every output of a sandbox that ended."""
        self._outputs.pop(sandbox_id, None)
        self._last.pop(sandbox_id, None)
