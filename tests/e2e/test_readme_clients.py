"""The README's client section works as written: every stdio config it shows (Claude Code's
command line, Claude Desktop's, Cursor's and VS Code's JSON) starts this checkout's server with
the short PATH a desktop client gives, and the official client lists its tools through it; the
Python HTTP example runs against a real `dockyard serve --http` with a minted token."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import anyio
import docker
import pytest
from mcp import Client, StdioServerParameters

from tests.conftest import call, make_settings, remove_instance
from tests.served import mint, serve, stop

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDER = "/path/to/dockyard"


def client_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Use it from a client\n")
    return text[start : text.index("### Security", start)]


def stdio_configs() -> dict[str, tuple[str, list[str]]]:
    """{where it came from: (command, args)} of every stdio config the section shows."""
    section = client_section()
    found: dict[str, tuple[str, list[str]]] = {}
    for number, block in enumerate(re.findall(r"```json\n(.*?)```", section, re.S)):
        config = json.loads(block)
        servers = config.get("mcpServers") or config["servers"]
        entry = servers["dockyard"]
        assert entry.get("type", "stdio") == "stdio", entry
        found[f"json block {number}"] = (entry["command"], entry["args"])
    (line,) = [ln for ln in section.splitlines() if ln.startswith("claude mcp add dockyard -- ")]
    argv = shlex.split(line.split(" -- ", 1)[1])
    found["claude mcp add"] = (argv[0], argv[1:])
    return found


def test_the_section_shows_each_client_named() -> None:
    section = client_section()
    for client in ("Claude Code", "Claude Desktop", "Cursor", "VS Code"):
        assert client in section
    configs = stdio_configs()
    assert len(configs) == 4, configs  # Claude Code's line and three JSON configs
    assert '"servers"' in section and '"type": "stdio"' in section  # VS Code's own form


@pytest.mark.parametrize("source", sorted(stdio_configs()))
async def test_each_stdio_config_starts_the_server_with_a_desktop_path(
    source: str, tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    command, args = stdio_configs()[source]
    assert command.startswith(PLACEHOLDER), command
    data_dir = tmp_path / "data"
    env = {
        "PATH": "/usr/bin:/bin",  # what a desktop app typically hands its servers
        "DOCKYARD_DATA_DIR": str(data_dir),
        "POOL_MIN": "0",
        "DOCKYARD_TEMPLATES__COMPUTER__POOL__MIN": "0",
    }
    params = StdioServerParameters(command=str(ROOT) + command.removeprefix(PLACEHOLDER), args=args, env=env)
    try:
        with anyio.fail_after(120):
            async with Client(params) as client:
                names = {tool.name for tool in (await client.list_tools()).tools}
                assert {"sandbox_create", "sandbox_exec", "dispatch"} <= names
                assert (await call(client, "whoami"))["user_id"] == "operator"
    finally:
        remove_instance(docker_client, make_settings(data_dir))


async def test_the_python_http_example_runs_as_written(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    (example,) = re.findall(r"```python\n(.*?)```", client_section(), re.S)
    served = serve(tmp_path / "data")
    try:
        token = (await mint(served, workspace_id="readme", scopes=["sandbox:create"]))["token"]
        script = example.replace("http://127.0.0.1:8765", served.url).replace('"dyt_..."', json.dumps(token))
        assert script != example
        ran = await anyio.to_thread.run_sync(
            lambda: subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        )
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert "'sandbox_id': 'sbx_" in ran.stdout, ran.stdout
    finally:
        stop(served)
        remove_instance(docker_client, make_settings(served.data_dir))
