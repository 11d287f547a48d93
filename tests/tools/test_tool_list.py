"""The tool list a client pays for on every turn: toolsets, per-token lists, trimmed schemas,
titles, honest annotations and capabilities, strict arguments and compact results.

Driven through the official client: in process for the listings, the real `dockyard serve`
over stdio for `--toolsets`, and over HTTP with real tokens for the per-token lists.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from mcp import Client, StdioServerParameters
from mcp.types import Tool

from dockyard.runtime.substrate.actions import Toolset
from dockyard.runtime.substrate.settings import Settings
from dockyard.server.app import build_server
from tests.conftest import call, call_error, make_settings, remove_instance, sh
from tests.served import DOCKYARD, Served, connect, mint

pytestmark = pytest.mark.anyio

LIST_BUDGET = 32 * 1024
RUNS_CODE_OR_STARTS_RUNTIMES = ["sandbox_exec", "dispatch", "team_spawn", "team_message", "team_broadcast"]


def listed_size(tools: list[Tool]) -> int:
    """The tool list as it goes over the wire, compact."""
    dumped = [tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in tools]
    return len(json.dumps(dumped, separators=(",", ":"), ensure_ascii=False))


def schema_titles(schema: Any, where: str = "") -> list[str]:
    """Where a JSON schema uses the `title` keyword (a property named title is not one)."""
    found: list[str] = []
    if isinstance(schema, list):
        for index, item in enumerate(schema):
            found += schema_titles(item, f"{where}[{index}]")
    if not isinstance(schema, dict):
        return found
    if "title" in schema:
        found.append(where or "/")
    for key, value in schema.items():
        if key in ("properties", "$defs", "patternProperties") and isinstance(value, dict):
            for name, sub in value.items():
                found += schema_titles(sub, f"{where}/{key}/{name}")
        elif key in ("items", "additionalProperties", "anyOf", "oneOf", "allOf", "not", "prefixItems"):
            found += schema_titles(value, f"{where}/{key}")
    return found


@pytest.fixture
def quiet(tmp_path: Path, sandbox_image: str) -> Settings:
    """Settings whose pools keep nothing warm: listing tools needs no runtime."""
    return make_settings(tmp_path / "data", default_pool={"min": 0})


@pytest.fixture
async def every_toolset(quiet: Settings, cleanup: None) -> AsyncIterator[Client]:
    async with Client(build_server(quiet, toolsets=list(Toolset))) as client:
        yield client


async def test_the_default_stdio_tool_list_fits_in_32_kb_and_offers_sandbox_and_dispatch(
    tmp_path: Path, sandbox_image: str, cleanup: None
) -> None:
    shipped = make_settings(tmp_path / "data", default_pool={"min": 0}, toolsets={})
    async with Client(build_server(shipped)) as client:
        tools = (await client.list_tools()).tools
    names = {tool.name for tool in tools}
    assert {"sandbox_create", "sandbox_exec", "dispatch", "await_dispatch", "whoami"} <= names
    assert not {"team_create", "computer_create", "token_mint", "audit_query"} & names
    assert listed_size(tools) <= LIST_BUDGET, f"the default tool list is {listed_size(tools)} bytes"


async def test_no_schema_in_the_tool_list_carries_a_title_keyword(every_toolset: Client) -> None:
    tools = (await every_toolset.list_tools()).tools
    titled = {
        tool.name: schema_titles(tool.input_schema) + schema_titles(tool.output_schema or {})
        for tool in tools
        if schema_titles(tool.input_schema) + schema_titles(tool.output_schema or {})
    }
    assert not titled, f"title keywords in schemas: {titled}"
    team_add_tasks = next(tool for tool in tools if tool.name == "team_add_tasks")
    assert "title" in team_add_tasks.input_schema["properties"]["tasks"]["items"]["properties"]  # a field, kept
    assert all(tool.output_schema is not None for tool in tools if tool.name != "computer_screenshot")


async def test_every_tool_has_a_title_and_belongs_to_exactly_one_toolset(quiet: Settings, cleanup: None) -> None:
    """A tool registered without a toolset would be in no toolset's list; in two, counted twice."""
    async with Client(build_server(quiet, toolsets=list(Toolset))) as client:
        everything = (await client.list_tools()).tools
    untitled = [tool.name for tool in everything if not tool.title]
    assert not untitled, f"tools without a title: {untitled}"
    seen: dict[str, str] = {}
    for toolset in Toolset:
        for tool in await build_server(quiet, toolsets=[toolset]).list_tools():
            assert tool.name not in seen, f"{tool.name} is in both {seen[tool.name]} and {toolset}"
            seen[tool.name] = toolset
    assert sorted(seen) == sorted(tool.name for tool in everything)


async def test_a_tool_cannot_be_added_to_the_server_without_its_toolset_and_title(quiet: Settings) -> None:
    async def extra_tool() -> str:
        """A tool someone adds the SDK's way."""
        return "hi"

    server = build_server(quiet)
    with pytest.raises(TypeError, match="toolset"):
        server.add_tool(extra_tool)


async def test_annotations_are_honest_about_running_code_and_reaching_the_web(
    every_toolset: Client, quiet: Settings
) -> None:
    tools = {tool.name: tool for tool in (await every_toolset.list_tools()).tools}
    for name in RUNS_CODE_OR_STARTS_RUNTIMES:
        assert tools[name].annotations is not None and tools[name].annotations.destructive_hint, name
    assert tools["computer_navigate"].annotations is not None
    assert tools["computer_navigate"].annotations.open_world_hint
    assert tools["sandbox_exec"].annotations is not None
    assert tools["sandbox_exec"].annotations.open_world_hint is False  # no sandbox may have the internet
    online = quiet.model_copy(update={"sandbox": quiet.sandbox.model_copy(update={"allow_internet": True})})
    exec_online = next(
        t for t in await build_server(online, toolsets=list(Toolset)).list_tools() if t.name == "sandbox_exec"
    )
    assert exec_online.annotations is not None and exec_online.annotations.open_world_hint


@pytest.mark.parametrize("mode", ["legacy", "auto"])
async def test_no_prompts_are_advertised_and_the_tool_list_never_changes_within_a_session(
    quiet: Settings, cleanup: None, mode: Any
) -> None:
    """On the initialize handshake (2025-11-25) and on server/discover (2026-07-28) alike."""
    async with Client(build_server(quiet, toolsets=list(Toolset)), mode=mode) as client:
        capabilities = client.server_capabilities
        assert (mode == "legacy") == (client.protocol_version == "2025-11-25"), client.protocol_version
        assert capabilities.prompts is None
        assert capabilities.tools is not None and not capabilities.tools.list_changed
        assert capabilities.resources is not None  # the dispatch resource is still there


async def test_a_misspelled_argument_is_refused_naming_the_one_it_meant_and_nothing_runs(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    error = await call_error(client, "sandbox_exec", sandbox_id=sid, command="touch ran", timeout=5)
    assert "unknown argument 'timeout'" in error
    assert "timeout_s" in error and "sandbox_id, command, cwd, env, timeout_s, stdin" in error
    assert (await sh(client, sid, "ls"))["stdout"] == ""


async def test_a_client_flooding_a_call_with_unknown_arguments_gets_a_short_refusal_and_nothing_runs(
    client: Client,
) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    flood = {f"arg{n}_" + "x" * 500: n for n in range(2000)}
    error = await call_error(client, "sandbox_exec", sandbox_id=sid, command="touch ran", **flood)
    assert "and 1995 more" in error and len(error) < 1500, error[:300]
    assert (await sh(client, sid, "ls"))["stdout"] == ""


async def test_a_null_or_mistyped_ref_gets_a_plain_message_not_a_validation_dump(client: Client) -> None:
    null = await call_error(client, "sandbox_exec", sandbox_id=None, command="true")
    assert "'sandbox_id' must be a valid string, not null" in null
    assert "A sandbox id (sbx_...)" in null  # what is allowed
    number = await call_error(client, "sandbox_destroy", sandbox_id=12)
    assert "'sandbox_id' must be a valid string, not 12" in number
    missing = await call_error(client, "sandbox_exec", command="true")
    assert "'sandbox_id' is missing" in missing
    for message in (null, number, missing):
        assert "validation error" not in message and "type=" not in message and "pydantic" not in message


async def test_a_structured_result_is_sent_once_as_data_and_once_as_compact_json(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    result = await client.call_tool("sandbox_exec", {"sandbox_id": sid, "command": "echo hi"})
    (block,) = result.content
    assert block.type == "text"
    assert json.loads(block.text) == result.structured_content
    assert "\n " not in block.text and '": ' not in block.text


@pytest.fixture
def stdio_data_dir(tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient) -> Iterator[Path]:
    path = tmp_path / "stdio"
    yield path
    remove_instance(docker_client, make_settings(path))


async def test_serve_with_the_sandbox_toolset_lists_only_sandbox_tools_and_refuses_a_dispatch(
    stdio_data_dir: Path,
) -> None:
    env = {
        "DOCKYARD_DATA_DIR": str(stdio_data_dir),
        "PATH": os.environ["PATH"],
        "POOL_MIN": "0",
        "DOCKYARD_TEMPLATES__COMPUTER__POOL__MIN": "0",
    }
    params = StdioServerParameters(command=DOCKYARD, args=["serve", "--toolsets", "sandbox"], env=env)
    async with Client(params) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert "sandbox_exec" in names and "whoami" in names
        assert not {name for name in names if not name.startswith(("sandbox_", "snapshot_", "whoami"))}
        error = await call_error(client, "dispatch", mode="remote", rationale="r", task_summary="t", prompt="echo no")
        assert "'dispatch' toolset" in error and "--toolsets" in error
        assert (await call(client, "whoami"))["user_id"] == "operator"  # still served


async def test_an_http_token_with_sandbox_scopes_lists_no_team_admin_or_computer_tools(
    served: Served, quiet: Settings
) -> None:
    family = {
        toolset: {tool.name for tool in await build_server(quiet, toolsets=[toolset]).list_tools()}
        for toolset in (Toolset.TEAM, Toolset.ADMIN, Toolset.COMPUTER)
    }
    minted = await mint(served, scopes=["sandbox:exec", "sandbox:files"], workspace_id="a")
    async with connect(served, minted["token"]) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"sandbox_exec", "sandbox_read_file", "sandbox_list", "whoami"} <= names
        assert "sandbox_create" not in names and "dispatch" not in names
        for toolset, members in family.items():
            assert not names & members, f"{toolset} tools listed to a sandbox token: {names & members}"
        hidden = await call_error(client, "team_create", name="sneaky")  # not listed, and refused as before
        assert "team:lead" in hidden
    async with connect(served, served.admin_key) as admin:
        admin_names = {tool.name for tool in (await admin.list_tools()).tools}
    assert {"token_mint", "token_revoke", "audit_query", "audit_verify"} <= admin_names
    assert "sandbox_create" not in admin_names and "team_create" not in admin_names
