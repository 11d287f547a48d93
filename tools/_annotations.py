"""The MCP annotations a tool can carry: one preset per kind of effect, and what it can reach.

Every preset states all four hints, so a client never guesses a default.

    preset                   changes state   destroys or overwrites   same call again changes more
    READ_ONLY                no              no                       no
    ADDITIVE                 yes             no                       yes (a second sandbox, message, ...)
    IDEMPOTENT               yes             no                       no
    DESTRUCTIVE              yes             yes                      yes (a command runs again)
    DESTRUCTIVE_IDEMPOTENT   yes             yes                      no (a file written, a sandbox gone)

A tool that runs code is DESTRUCTIVE: a command (`sandbox_exec`), a dispatch's runner (in a
sandbox the caller uses, or on the host), a team member's turn (`team_spawn`, and the messages
and plan answers that wake a member). So is acting on a web page (a click can delete what the
page shows). Creating a sandbox or a computer is ADDITIVE: a fresh runtime runs nothing of the
caller's until asked.

`Reach` says whether a tool can touch an open world (`openWorldHint`): the pages a computer
opens are web applications; a command reaches the internet where sandboxes may have it; a
runner may reach out where a runner calls a model's API, runs on the host or has the internet.
"""

from __future__ import annotations

from enum import Enum

from mcp.types import ToolAnnotations

from dockyard.runtime.substrate.settings import Settings

__all__ = ["ADDITIVE", "DESTRUCTIVE", "DESTRUCTIVE_IDEMPOTENT", "IDEMPOTENT", "READ_ONLY", "Reach", "annotated"]


def _preset(*, read_only: bool, destructive: bool, idempotent: bool) -> ToolAnnotations:
    return ToolAnnotations(
        read_only_hint=read_only, destructive_hint=destructive, idempotent_hint=idempotent, open_world_hint=False
    )


READ_ONLY = _preset(read_only=True, destructive=False, idempotent=True)
ADDITIVE = _preset(read_only=False, destructive=False, idempotent=False)
IDEMPOTENT = _preset(read_only=False, destructive=False, idempotent=True)
DESTRUCTIVE = _preset(read_only=False, destructive=True, idempotent=False)
DESTRUCTIVE_IDEMPOTENT = _preset(read_only=False, destructive=True, idempotent=True)


class Reach(Enum):
    """What beyond dockyard a tool can touch."""

    NOTHING = "nothing"
    WEB_PAGES = "web pages"  # a computer acting on the page it opened
    SANDBOX_NETWORK = "sandbox network"  # a command, in a sandbox that may have the internet
    RUNNERS = "runners"  # a dispatch's or a member's runner

    def is_open(self, settings: Settings) -> bool:
        """Whether this reach is an open world under these settings."""
        internet = settings.sandbox.allow_internet
        if self is Reach.WEB_PAGES:
            return True
        if self is Reach.SANDBOX_NETWORK:
            return internet
        if self is Reach.RUNNERS:
            llm = any(profile.kind == "llm" for profile in settings.runners.values())
            return internet or llm or settings.dispatch.user_pc.enabled
        return False


def annotated(preset: ToolAnnotations, reach: Reach, settings: Settings) -> ToolAnnotations:
    """The preset, with `openWorldHint` as far as the tool reaches under these settings."""
    return preset.model_copy(update={"open_world_hint": reach.is_open(settings)})
