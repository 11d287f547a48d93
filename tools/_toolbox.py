"""The server's tools, each registered once with its toolset, title, annotations and scopes.

A family's `register(tools)` adds each of its tools in one line:

    tools.add(sandbox_exec, Toolset.SANDBOX, "Run a command", DESTRUCTIVE, [Scope.SANDBOX_EXEC])

The toolbox lists a tool only if its toolset is one the server offers and the caller holds one
of its scopes (none: every caller), and calls it only if its toolset is offered; the tool itself
still checks the caller's scope. Arguments are checked strictly before the tool runs: an unknown
argument, a missing one or a value of the wrong type is refused with what was wrong and what the
tool takes. A structured result's text is its compact JSON.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.mcpserver.tools import Tool
from mcp.types import CallToolResult, InputRequiredResult, TextContent, ToolAnnotations
from mcp.types import Tool as ListedTool
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails

from dockyard.runtime.substrate.actions import Scope, Toolset
from dockyard.runtime.substrate.settings import Identity, Settings
from dockyard.runtime.substrate.tokens import holds
from dockyard.tools._annotations import Reach, annotated
from dockyard.tools._schemas import trimmed_input, trimmed_output

__all__ = ["Toolbox"]

_MAX_SHOWN = 5  # problems named in one refusal; a flood of bad arguments gets a short answer
_MAX_NAME = 40
_SHOULD = re.compile(r"^(Input|String|Value|List|Dictionary|Object|Tuple|Set|Decimal) should ")


@dataclass(frozen=True)
class _Entry:
    tool: Tool
    toolset: Toolset
    scopes: tuple[Scope, ...]
    arguments: type[BaseModel]  # the tool's arguments, refusing any it does not name
    listed: ListedTool


class Toolbox:
    """Every tool of one server, and which of them each caller may see and call."""

    def __init__(self, settings: Settings, offered: Iterable[Toolset]) -> None:
        self.settings = settings
        self.offered = frozenset(offered)
        self._entries: dict[str, _Entry] = {}

    def add(
        self,
        fn: Callable[..., Any],
        toolset: Toolset,
        title: str,
        preset: ToolAnnotations,
        scopes: Sequence[Scope],
        *,
        reach: Reach = Reach.NOTHING,
    ) -> None:
        """Register `fn` as a tool of `toolset`, listed to callers holding any of `scopes` (all if none)."""
        # The title also in the annotations, where clients of the 2025-03-26 protocol look for it.
        hints = annotated(preset, reach, self.settings).model_copy(update={"title": title})
        tool = Tool.from_function(fn, title=title, annotations=hints)
        if tool.name in self._entries:
            raise ValueError(f"tool {tool.name} is registered twice")
        strict = _strict(tool.fn_metadata.arg_model)
        output = tool.output_schema
        listed = ListedTool(
            name=tool.name,
            title=title,
            description=_description(tool.description),
            input_schema=trimmed_input(strict.model_json_schema(by_alias=True)),
            output_schema=trimmed_output(output) if output is not None else None,
            annotations=tool.annotations,
        )
        self._entries[tool.name] = _Entry(tool, toolset, tuple(scopes), strict, listed)

    def listed(self, who: Identity) -> list[ListedTool]:
        """The tools `who` sees: those of the offered toolsets that one of its scopes allows."""
        return [
            entry.listed
            for entry in self._entries.values()
            if entry.toolset in self.offered and (not entry.scopes or any(holds(who, s) for s in entry.scopes))
        ]

    async def call(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any]
    ) -> CallToolResult | InputRequiredResult:
        """Run a tool of an offered toolset on strictly checked arguments."""
        entry = self._entries.get(name)
        if entry is None:
            raise ToolError(f"unknown tool '{name}'; tools/list shows the tools this server offers")
        if entry.toolset not in self.offered:
            offered = ", ".join(sorted(self.offered)) or "none"
            raise ToolError(
                f"{name} is in the '{entry.toolset}' toolset, which this server does not offer (it offers: {offered}); "
                f"the operator can add it with `dockyard serve --toolsets` or [toolsets] in the config"
            )
        try:
            entry.arguments.model_validate(entry.tool.fn_metadata.pre_parse_json(arguments))
        except ValidationError as exc:
            raise ToolError(_explain(entry, exc.errors())) from exc
        result = await entry.tool.run(arguments, context, convert_result=True)
        return _compact(result) if isinstance(result, CallToolResult) else result


def _strict(arguments: type[BaseModel]) -> type[BaseModel]:
    """The arguments model, refusing arguments it does not name."""
    namespace = {"model_config": ConfigDict(extra="forbid"), "__module__": __name__, "__doc__": None}
    strict: type[BaseModel] = type(arguments.__name__, (arguments,), namespace)
    return strict


def _description(docstring: str) -> str:
    """A docstring as one line per paragraph, without its indentation."""
    paragraphs = inspect.cleandoc(docstring).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in paragraph.splitlines()) for paragraph in paragraphs)


def _compact(result: CallToolResult) -> CallToolResult:
    """A structured result whose text is its compact JSON, not a pretty-printed copy."""
    if result.structured_content is None or not result.content:
        return result
    if not all(isinstance(block, TextContent) for block in result.content):
        return result
    text = json.dumps(result.structured_content, separators=(",", ":"), ensure_ascii=False)
    return result.model_copy(update={"content": [TextContent(type="text", text=text)]})


def _where(loc: tuple[int | str, ...]) -> str:
    where = ""
    for part in loc:
        where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else str(part)
    return where


def _shown(value: Any) -> str:
    """What a caller passed, briefly: short scalars as they are, anything else by its JSON type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float | str) and len(json.dumps(value)) <= 40:
        return json.dumps(value)
    kinds = {str: "a string", int: "a number", float: "a number", list: "an array", dict: "an object"}
    return kinds.get(type(value), "a value of another type")


def _explain(entry: _Entry, errors: list[ErrorDetails]) -> str:
    """What was wrong with a call's arguments (the first few things), and what the tool takes."""
    name = entry.tool.name
    properties: dict[str, Any] = entry.listed.input_schema.get("properties", {})
    unknown = [str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden" and len(e["loc"]) == 1]
    problems = []
    if unknown:
        shown = unknown[:_MAX_SHOWN]
        guesses = [m for u in shown for m in difflib.get_close_matches(u[:_MAX_NAME], properties, n=1, cutoff=0.6)]
        hint = f" (did you mean {', '.join(repr(g) for g in guesses)}?)" if guesses else ""
        more = f" and {len(unknown) - len(shown)} more" if len(unknown) > len(shown) else ""
        quoted = ", ".join(_quoted(u) for u in shown)
        problems.append(f"unknown argument{'s' if len(unknown) > 1 else ''} {quoted}{more}{hint}")
    described: list[str] = []
    others = [e for e in errors if not (e["type"] == "extra_forbidden" and len(e["loc"]) == 1)]
    for error in others[:_MAX_SHOWN]:
        where = _quoted(_where(error["loc"]))
        if error["type"] == "missing":
            problems.append(f"{where} is missing")
        elif error["type"] == "extra_forbidden":
            problems.append(f"{where} is not a field it takes")
        else:
            problems.append(f"{where} {_SHOULD.sub('must ', error['msg'])}, not {_shown(error['input'])}")
        top = str(error["loc"][0]) if error["loc"] else ""
        if top in properties and top not in described and "description" in properties[top]:
            described.append(top)
    if len(others) > _MAX_SHOWN:
        problems.append(f"{len(others) - _MAX_SHOWN} more problems")
    about = "".join(f" {arg}: {properties[arg]['description']}" for arg in described)
    takes = ", ".join(properties) or "no arguments"
    return f"{name}: {'; '.join(problems)}. It takes: {takes}.{about}"


def _quoted(name: str) -> str:
    """A name the caller sent, quoted, and cut if it is long."""
    return repr(name[:_MAX_NAME] + "...") if len(name) > _MAX_NAME else repr(name)
