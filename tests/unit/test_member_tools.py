"""An `llm` member's team tools and the MCP tools of the same names take the same parameters.

A member calls its team tools in process, a client over MCP; both must accept what the other
accepts, with the same types, bounds and defaults (the team being the member's own, an `llm`
member never names its team).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from dockyard.runtime.substrate.actions import Toolset
from dockyard.runtime.substrate.settings import load_settings
from dockyard.runtime.work.teams.membertools import MEMBER_TOOLS, TEAM_TOOLS
from dockyard.server.app import build_server
from dockyard.tools._schemas import trimmed_input

pytestmark = pytest.mark.anyio


async def _mcp_team_tools(data_dir: Path) -> dict[str, dict[str, Any]]:
    server = build_server(load_settings(data_dir=data_dir), toolsets=[Toolset.TEAM])
    return {tool.name: tool.input_schema for tool in await server.list_tools()}


def _without_team_id(schema: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    properties = {name: value for name, value in schema.get("properties", {}).items() if name != "team_id"}
    return properties, set(schema.get("required", [])) - {"team_id"}


async def test_each_llm_team_tool_takes_the_parameters_of_the_mcp_tool_of_its_name(tmp_path: Path) -> None:
    mcp_tools = await _mcp_team_tools(tmp_path)
    for spec in TEAM_TOOLS:
        name = spec["function"]["name"]
        assert name in mcp_tools, f"the llm member's tool {name} has no MCP tool of that name"
        parameters = trimmed_input(spec["function"]["parameters"])  # as the tool list carries a schema
        assert (parameters.get("properties", {}), set(parameters.get("required", []))) == _without_team_id(
            mcp_tools[name]
        ), f"{name}: the llm member's parameters differ from the MCP tool's"


async def test_every_member_tool_is_offered_to_llm_members_with_a_description() -> None:
    offered = {spec["function"]["name"]: spec["function"]["description"] for spec in TEAM_TOOLS}
    assert set(offered) == set(MEMBER_TOOLS)
    assert all(description.strip() for description in offered.values())
