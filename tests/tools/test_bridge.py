"""dockyard-bridge: a program inside a sandbox with no network, using the official MCP client,
reaches dockyard's tools through the sandbox's supervisor, acting as the sandbox's owner."""

from __future__ import annotations

import json
import subprocess

import anyio
import docker
import pytest
from mcp import Client
from sqlmodel import Session, create_engine, select

from dockyard.runtime.settings import Settings
from dockyard.runtime.store import Runtime
from tests.conftest import call, container_of, sh
from tests.mcpbundle import mcp_client_tar

pytestmark = pytest.mark.anyio

ASK = """
import json
import anyio
from mcp import Client, StdioServerParameters

async def main():
    async with Client(StdioServerParameters(command="dockyard-bridge")) as client:
        names = sorted(tool.name for tool in (await client.list_tools()).tools)
        who = (await client.call_tool("whoami", {})).structured_content
        made = (await client.call_tool("sandbox_create", {})).structured_content
        ran = (await client.call_tool("sandbox_exec", {"sandbox_id": made["sandbox_id"], "command": "echo from-inside"}))
        listed = (await client.call_tool("sandbox_list", {})).structured_content
        print(json.dumps({"tools": names, "whoami": who, "made": made["sandbox_id"],
                          "ran": ran.structured_content["stdout"], "listed": [s["sandbox_id"] for s in listed["sandboxes"]]}))

anyio.run(main)
"""

INITIALIZE = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}},
    }
)


async def test_official_client_in_a_networkless_sandbox_uses_dockyard_through_the_bridge(
    client: Client, settings: Settings, docker_client: docker.DockerClient
) -> None:
    sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
    info = container_of(docker_client, settings, sandbox_id)
    assert info["HostConfig"]["NetworkMode"] == "none"
    # The sandbox cannot pip install (no network): the SDK installed here is copied in.
    assert docker_client.containers.get(info["Id"]).put_archive("/workspace", mcp_client_tar(".mcp"))
    await call(client, "sandbox_write_file", sandbox_id=sandbox_id, path="ask.py", content=ASK)

    result = await sh(client, sandbox_id, "PYTHONPATH=/workspace/.mcp python3 ask.py", timeout_s=120)
    assert result["exit_code"] == 0, result["stderr"][-2000:]
    answer = json.loads(result["stdout"])
    assert {"whoami", "sandbox_create", "sandbox_exec", "pool_status"} <= set(answer["tools"])
    assert answer["whoami"] == {"workspace_id": "local", "project_id": "default", "user_id": "operator", "run_id": None}
    assert answer["ran"] == "from-inside\n"
    # What the program made is its owner's: it is in their list, next to the sandbox it ran in.
    assert sorted(answer["listed"]) == sorted([sandbox_id, answer["made"]])
    outside = [s["sandbox_id"] for s in (await call(client, "sandbox_list"))["sandboxes"]]
    assert sorted(outside) == sorted(answer["listed"])


async def test_a_bridge_in_a_runtime_nobody_claimed_gets_no_answer(
    client: Client, settings: Settings, docker_client: docker.DockerClient
) -> None:
    with anyio.fail_after(60):
        while (await call(client, "pool_status"))["pools"][0]["warm"] < 1:
            await anyio.sleep(0.1)
    with Session(create_engine(f"sqlite:///{settings.store_path}")) as session:
        warm = session.exec(select(Runtime).where(Runtime.state == "warm")).first()
    assert warm is not None and warm.container_id
    probe = subprocess.run(
        ["docker", "exec", "-i", "-u", "agent", warm.container_id, "dockyard-bridge"],
        input=INITIALIZE + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0 and probe.stdout == "", (probe.stdout, probe.stderr)
