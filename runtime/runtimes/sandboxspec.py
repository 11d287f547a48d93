"""What a sandbox_create (or a command's env) asks for, checked against the settings: the
template, the network, the cpu and memory caps, the time to live and environment names.

Pure checks, no I/O: each returns the value to use or raises the error the caller sees.
"""

from __future__ import annotations

import re

from dockyard.runtime.substrate.errors import InvalidRequestError, NetworkNotAllowedError, TemplateNotFoundError
from dockyard.runtime.substrate.settings import SandboxSettings, Settings, TemplateSettings

__all__ = ["capped", "checked_env", "sandbox_template", "ttl_within", "usable_network"]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def checked_env(env: dict[str, str] | None) -> dict[str, str]:
    """A copy of `env`, once every name is a valid variable name outside dockyard's own prefix."""
    for name in env or {}:
        if not _ENV_NAME.match(name) or name.startswith("DOCKYARD_"):
            raise InvalidRequestError(
                f"invalid environment variable name '{name}'; use letters, digits and '_' (not starting "
                "with a digit), and not the reserved DOCKYARD_ prefix"
            )
    return dict(env or {})


def sandbox_template(settings: Settings, name: str) -> TemplateSettings:
    """A sandbox template; a computer's template is refused, its runtimes have no supervisor."""
    tpl = settings.templates.get(name)
    sandboxes = sorted(n for n, t in settings.templates.items() if t.kind == "sandbox")
    if tpl is None:
        raise TemplateNotFoundError(name, sandboxes)
    if tpl.kind != "sandbox":
        raise InvalidRequestError(
            f"template '{name}' is a {tpl.kind}; use {tpl.kind}_create (sandbox templates: {', '.join(sandboxes)})"
        )
    return tpl


def usable_network(limits: SandboxSettings, mode: str) -> str:
    """`mode`, if the settings allow it for a sandbox."""
    allowed = ["none", "workspace"] + (["internet"] if limits.allow_internet else [])
    if mode not in allowed:
        why = " (disabled by config: sandbox.allow_internet)" if mode == "internet" else ""
        raise NetworkNotAllowedError(f"network '{mode}' is not allowed{why}; allowed: {', '.join(allowed)}")
    return mode


def capped(name: str, value: float, cap: float) -> float:
    """`value`, if it is within `cap` (a setting named by `name`)."""
    if value > cap:
        raise InvalidRequestError(f"{name} {value} is over the cap; allowed: up to {cap}")
    return value


def ttl_within(limits: SandboxSettings, ttl_s: int | None) -> int:
    """The time to live to use: `ttl_s`, or the default, within the cap (0: none)."""
    ttl = limits.default_ttl_s if ttl_s is None else ttl_s
    if ttl > limits.max_ttl_s:
        raise InvalidRequestError(f"ttl_s {ttl} is over the cap; allowed: 1..{limits.max_ttl_s}")
    return ttl
