"""Where a dispatch goes, and whether it may: modes, the hints that override a caller's choice,
and the checks a request must pass. Pure: no store, no Docker.

Modes: `local` (the caller's own sandbox), `remote` (a fresh sandbox from the pool),
`team_single_vm` (members sharing one sandbox), `team_multi_vm` (each member its own) and
`user_pc` (the machine dockyard runs on: refused unless config enables it, the caller holds
`dispatch:user_pc` and the user confirmed this very run).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from dockyard.runtime.substrate.actions import Scope
from dockyard.runtime.substrate.errors import InvalidRequestError
from dockyard.runtime.substrate.settings import Identity, Settings

__all__ = [
    "MAX_MEMBERS",
    "MODES",
    "TEAM_MODES",
    "Consent",
    "Mode",
    "Route",
    "check",
    "check_host",
    "consent_question",
    "host_dir",
    "route",
]


class Mode(StrEnum):
    """Where a dispatch's work runs (stored as these strings)."""

    LOCAL = "local"
    REMOTE = "remote"
    TEAM_SINGLE_VM = "team_single_vm"
    TEAM_MULTI_VM = "team_multi_vm"
    USER_PC = "user_pc"


class Consent(StrEnum):
    """The user's answer to a `user_pc` dispatch's confirmation."""

    CONFIRMED = "confirmed"
    DECLINED = "declined"
    CANCELLED = "cancelled"
    UNAVAILABLE = "unavailable"  # the client cannot ask


MODES = tuple(Mode)
TEAM_MODES = (Mode.TEAM_SINGLE_VM, Mode.TEAM_MULTI_VM)
MAX_MEMBERS = 8
# Phrases in a task that decide its mode whatever the caller chose.
_HINTS = [
    (re.compile(r"\b(clean|fresh|isolated) (environment|sandbox|machine)\b", re.I), Mode.REMOTE),
    (re.compile(r"\b(async|asynchronously|in the background)\b", re.I), Mode.REMOTE),
    (re.compile(r"\buse (a|the) team\b|\bas a team\b", re.I), Mode.TEAM_MULTI_VM),
]
_REFUSED_CONSENT: dict[str, str] = {
    Consent.DECLINED: "the user declined to run it on this computer",
    Consent.CANCELLED: "the user dismissed the confirmation",
    Consent.UNAVAILABLE: "this client cannot ask the user to confirm it (it does not support elicitation)",
}


@dataclass(frozen=True)
class Route:
    """The mode a task runs in, and the hint that chose it when a phrase in the task overrode
    the caller's choice (None: the caller's choice stands)."""

    mode: str
    hint: str | None


def route(mode: str, task_summary: str, prompt: str | None) -> Route:
    """Where a task runs: the caller's mode, unless a phrase in the task says otherwise."""
    text = f"{task_summary}\n{prompt or ''}"
    for pattern, forced in _HINTS:
        if (found := pattern.search(text)) and forced != mode:
            return Route(forced.value, f"the task says '{found.group(0)}', so it runs as {forced}")
    return Route(mode, None)


def check(
    settings: Settings, mode: str, runner: str, prompt: str | None, sandbox_id: str | None, members: list[str] | None
) -> None:
    """Refuse a request that cannot run as asked, saying what is allowed."""
    if mode not in MODES:
        raise InvalidRequestError(f"unknown mode '{mode}'; allowed: {', '.join(MODES)}")
    if mode == Mode.USER_PC and not settings.dispatch.user_pc.enabled:
        raise InvalidRequestError(
            "mode 'user_pc' (the machine dockyard runs on) is off on this server; use 'remote' for an isolated runtime"
        )
    if mode in TEAM_MODES and not members:
        raise InvalidRequestError(
            f"mode '{mode}' needs members: one prompt (for the script runner, a script) per member"
        )
    if members and len(members) > MAX_MEMBERS:
        raise InvalidRequestError(f"at most {MAX_MEMBERS} members; got {len(members)}")
    profiles = settings.runners
    if runner not in profiles:
        raise InvalidRequestError(f"unknown runner '{runner}'; allowed: {', '.join(sorted(profiles))}")
    if mode not in TEAM_MODES and (not prompt or not prompt.strip()):
        raise InvalidRequestError(f"runner '{runner}' needs a prompt: the script to run, or the task for the command")
    if mode == Mode.LOCAL and not sandbox_id:
        raise InvalidRequestError("mode 'local' runs in your current sandbox: give its sandbox_id")


def check_host(settings: Settings, who: Identity, runner: str, consent: str | None) -> None:
    """A `user_pc` dispatch runs only where config enables it, for a caller holding the scope,
    with a runner allowed on the host, and once the user confirmed it."""
    host = settings.dispatch.user_pc
    if not who.allows(Scope.DISPATCH_USER_PC):
        raise InvalidRequestError(
            "mode 'user_pc' needs the dispatch:user_pc scope, which this token does not hold; use 'remote'"
        )
    if runner not in host.runners or settings.runners[runner].kind == "llm":
        allowed = [name for name in host.runners if name in settings.runners and settings.runners[name].kind != "llm"]
        raise InvalidRequestError(
            f"runner '{runner}' may not run on the host; allowed there: {', '.join(allowed) or 'none'}"
        )
    if consent != Consent.CONFIRMED:
        why = _REFUSED_CONSENT.get(consent or "", "it was not confirmed by the user")
        raise InvalidRequestError(f"mode 'user_pc' did not run: {why}; use 'remote' for an isolated runtime")


def consent_question(
    settings: Settings, who: Identity, mode: str, task_summary: str, prompt: str | None, runner: str | None
) -> str | None:
    """What to ask the user before a `user_pc` dispatch, or None when it will not run on the
    host anyway (another mode, the mode off, or a caller or runner it refuses)."""
    used = route(mode, task_summary, prompt).mode
    if used != Mode.USER_PC:
        return None
    try:
        check(settings, used, runner or "script", prompt, None, None)
        check_host(settings, who, runner or "script", Consent.CONFIRMED)
    except InvalidRequestError:
        return None
    return (
        f"Run a task on this computer, outside any sandbox, as the user dockyard runs as, in {host_dir(settings)}?\n"
        f"Task: {task_summary}\nRunner: {runner or 'script'}\n---\n{(prompt or '')[:2000]}"
    )


def host_dir(settings: Settings) -> Path:
    """Where a `user_pc` run starts."""
    return settings.dispatch.user_pc.workdir or Path.home()
