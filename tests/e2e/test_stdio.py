"""The real `dockyard serve` over stdio, driven by the official MCP client."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from mcp import Client, StdioServerParameters

from tests.conftest import call, make_settings, remove_instance, sh

pytestmark = pytest.mark.anyio

DOCKYARD = str(Path(sys.executable).parent / "dockyard")


@pytest.fixture
def data_dir(tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient) -> Iterator[Path]:
    """A data dir for served instances; their containers are removed afterwards."""
    path = tmp_path / "data"
    yield path
    remove_instance(docker_client, make_settings(path))


def serve(data_dir: Path) -> Client:
    env = {"DOCKYARD_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin", "DOCKYARD_TEMPLATES__COMPUTER__POOL__MIN": "0"}
    return Client(StdioServerParameters(command=DOCKYARD, args=["serve"], env=env))


async def test_serve_over_stdio_runs_a_sandbox_session_end_to_end(data_dir: Path) -> None:
    async with serve(data_dir) as client:
        names = {tool.name for tool in (await client.list_tools()).tools}
        assert {"sandbox_create", "sandbox_exec", "sandbox_snapshot", "sandbox_destroy"} <= names
        sid = (await call(client, "sandbox_create"))["sandbox_id"]
        await call(client, "sandbox_write_file", sandbox_id=sid, path="hello.py", content="print(6 * 7)")
        assert (await sh(client, sid, "python3 hello.py"))["stdout"] == "42\n"
        await call(client, "sandbox_destroy", sandbox_id=sid)
        assert (await call(client, "sandbox_list"))["sandboxes"] == []


async def test_sandboxes_survive_a_server_restart_and_are_adopted(data_dir: Path) -> None:
    async with serve(data_dir) as client:
        sid = (await call(client, "sandbox_create"))["sandbox_id"]
        await sh(client, sid, "echo kept > note.txt")
    async with serve(data_dir) as client:
        listed = (await call(client, "sandbox_list"))["sandboxes"]
        assert [s["sandbox_id"] for s in listed] == [sid]
        assert (await sh(client, sid, "cat note.txt"))["stdout"] == "kept\n"
