"""The one place where engine errors become MCP tool errors."""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

from mcp.server.mcpserver.exceptions import ToolError

from dockyard.runtime.substrate.errors import DockyardError

__all__ = ["tool_errors"]

log = logging.getLogger("dockyard.tools")
P = ParamSpec("P")
R = TypeVar("R")


def tool_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Pass a `DockyardError`'s message on as a `ToolError`; hide anything else behind a ref."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except ToolError:
            raise
        except DockyardError as exc:
            raise ToolError(str(exc)) from exc
        except Exception as exc:
            ref = secrets.token_hex(4)
            log.exception("internal error in %s (ref %s)", fn.__name__, ref)
            raise ToolError(f"internal error (ref {ref}); the server log has the details") from exc

    return wrapper
