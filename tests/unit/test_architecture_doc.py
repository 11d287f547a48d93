"""ARCHITECTURE.md stays true to the code: every tool the server registers has a row in its
table, each row names the service calls its tool makes, the Engine table names each service's
module, and every path and module the page names exists.

The server is built but not started, so no engine opens and Docker is not needed."""

from __future__ import annotations

import ast
import importlib.util
import re
import typing
from functools import cache
from pathlib import Path

import pytest

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.actions import Toolset
from dockyard.runtime.substrate.settings import load_settings
from dockyard.server.app import build_server

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "ARCHITECTURE.md"
CODE = re.compile(r"`([^`\s]+)`")
PATH_LIKE = re.compile(r"^[A-Za-z_.][\w.-]*(/[\w.-]*)+$|^[\w.-]+\.(py|md|toml)$")
MODULE_LIKE = re.compile(r"^dockyard(\.\w+)+$")


@cache
def doc() -> str:
    return DOC.read_text()


def table_rows() -> dict[str, list[str]]:
    """The tool table's rows, by the tool named in their first cell."""
    rows: dict[str, list[str]] = {}
    for line in doc().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4 and cells[1].startswith("`tools/"):
            rows[cells[0].strip("`")] = cells
    return rows


def engine_calls(function: ast.AST) -> set[str]:
    """What a tool function calls on the engine: `engine.<field>.<method>` or `engine.<method>`."""
    calls = set()
    for node in ast.walk(function):
        if not isinstance(node, ast.Attribute):
            continue
        inner = node.value
        if isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name) and inner.func.id == "engine":
            if not any(isinstance(parent, ast.Attribute) and parent.value is node for parent in ast.walk(function)):
                calls.add(f"engine.{node.attr}")
        elif (
            isinstance(inner, ast.Attribute)
            and isinstance(inner.value, ast.Call)
            and isinstance(inner.value.func, ast.Name)
            and inner.value.func.id == "engine"
        ):
            calls.add(f"engine.{inner.attr}.{node.attr}")
    return calls


def tool_function(module: str, name: str) -> ast.AST:
    tree = ast.parse((ROOT / module).read_text())
    for node in tree.body:
        if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{module} has no function {name}")


async def test_every_tool_the_server_registers_has_a_row_in_the_tool_table(tmp_path: Path) -> None:
    server = build_server(load_settings(data_dir=tmp_path), toolsets=list(Toolset))
    registered = {tool.name for tool in await server.list_tools()}
    missing = sorted(registered - table_rows().keys())
    assert not missing, f"ARCHITECTURE.md's tool table has no row for {', '.join(missing)}"
    unknown = sorted(table_rows().keys() - registered)
    assert not unknown, f"ARCHITECTURE.md's tool table names tools the server does not register: {unknown}"


def test_each_row_names_the_tool_module_and_every_engine_call_of_its_function() -> None:
    for tool, (_, module, service, _) in table_rows().items():
        function = tool_function(module.strip("`"), tool)
        for call in engine_calls(function):
            assert f"`{call}`" in service, f"{tool}: its function calls {call}, which its row does not name"


def test_the_engine_table_names_the_module_of_each_service() -> None:
    hints = typing.get_type_hints(Engine)
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \| `([\w/.]+)` \|$", doc(), re.MULTILINE)
    assert rows, "ARCHITECTURE.md has no Engine table"
    for field, cls, path in rows:
        assert field in hints, f"Engine has no field {field}"
        kind = hints[field]
        assert kind.__name__ == cls, f"Engine.{field} is a {kind.__name__}, not a {cls}"
        module = kind.__module__.removeprefix("dockyard.").replace(".", "/") + ".py"
        assert module == path, f"{cls} is defined in {module}, not {path}"


def test_every_path_and_module_the_doc_names_exists() -> None:
    named = set(CODE.findall(doc()))
    paths = {name for name in named if PATH_LIKE.match(name) and not name.startswith("/")}
    assert paths, "no paths found in ARCHITECTURE.md"
    gone = sorted(path for path in paths if not (ROOT / path).exists())
    assert not gone, f"ARCHITECTURE.md names paths that do not exist: {gone}"
    modules = {name for name in named if MODULE_LIKE.match(name)}
    unknown = sorted(module for module in modules if importlib.util.find_spec(module) is None)
    assert not unknown, f"ARCHITECTURE.md names modules that do not exist: {unknown}"
