"""The MCP annotations a tool can carry: one preset per kind of effect.

Every preset states all four hints, so a client never guesses a default. No dockyard tool
reaches an open world (the web, a third party) on its own: `open_world_hint` is always False.

    preset                   changes state   destroys or overwrites   same call again changes more
    READ_ONLY                no              no                       no
    ADDITIVE                 yes             no                       yes (a second sandbox, message, ...)
    IDEMPOTENT               yes             no                       no
    DESTRUCTIVE              yes             yes                      yes (a command runs again)
    DESTRUCTIVE_IDEMPOTENT   yes             yes                      no (a file written, a sandbox gone)
"""

from __future__ import annotations

from mcp.types import ToolAnnotations

__all__ = ["ADDITIVE", "DESTRUCTIVE", "DESTRUCTIVE_IDEMPOTENT", "IDEMPOTENT", "READ_ONLY"]


def _preset(*, read_only: bool, destructive: bool, idempotent: bool) -> ToolAnnotations:
    return ToolAnnotations(
        read_only_hint=read_only, destructive_hint=destructive, idempotent_hint=idempotent, open_world_hint=False
    )


READ_ONLY = _preset(read_only=True, destructive=False, idempotent=True)
ADDITIVE = _preset(read_only=False, destructive=False, idempotent=False)
IDEMPOTENT = _preset(read_only=False, destructive=False, idempotent=True)
DESTRUCTIVE = _preset(read_only=False, destructive=True, idempotent=False)
DESTRUCTIVE_IDEMPOTENT = _preset(read_only=False, destructive=True, idempotent=True)
