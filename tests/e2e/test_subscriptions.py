"""resources/subscribe on the handshake protocol (2025-11-25) against the real `dockyard serve`:
over stdio, and over streamable HTTP with real tokens (what each protocol version's handshake
advertises, a workspace's own subscriptions, and tenants who must hear nothing of another's work).

Each hostile test plays the attacker through the official MCP client against
`dockyard serve --http` and checks both the refusal and that nothing reached it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import docker
import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.conftest import call, make_settings, remove_instance, sandbox_row
from tests.served import Served, connect, mint
from tests.tools.test_subscriptions import Heard

pytestmark = [
    pytest.mark.anyio,
    # the SDK's client warns that 2026-07-28 drops resources/subscribe; these sessions are 2025's
    pytest.mark.filterwarnings("ignore:resources/(un)?subscribe is removed as of 2026-07-28"),
]

DISPATCH = ["dispatch:create", "dispatch:read"]
TEAM = ["team:lead"]
DOCKYARD = str(Path(sys.executable).parent / "dockyard")
HANDSHAKE_VERSIONS = ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"]


@asynccontextmanager
async def legacy(served: Served, token: str) -> AsyncIterator[tuple[Client, Heard]]:
    """The official client over HTTP on the initialize handshake (2025-11-25), presenting `token`."""
    heard = Heard()
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
        transport = streamable_http_client(f"{served.url}/mcp", http_client=http)
        async with Client(transport, mode="legacy", message_handler=heard.handler) as client:
            assert client.protocol_version == "2025-11-25"
            yield client, heard


def initialize(served: Served, token: str, version: str) -> dict[str, Any]:
    """The raw `initialize` result a client offering `version` gets."""
    response = httpx2.post(
        f"{served.url}/mcp",
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        },
        json={
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"protocolVersion": version, "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    data = [line.removeprefix("data:").strip() for line in response.text.splitlines() if line.startswith("data:")]
    return json.loads(data[0] if data else response.text)["result"]


async def dispatched(client: Client, script: str) -> str:
    sent = await call(client, "dispatch", mode="remote", rationale="test", task_summary="a job", prompt=script)
    return f"dockyard://dispatches/{sent['dispatch_id']}"


@pytest.fixture
def data_dir(tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient) -> Iterator[Path]:
    """A data dir for a served instance; its containers are removed afterwards."""
    path = tmp_path / "data"
    yield path
    remove_instance(docker_client, make_settings(path))


async def test_a_2025_stdio_session_hears_a_dispatch_complete_and_a_sandbox_lost(
    data_dir: Path, docker_client: docker.DockerClient
) -> None:
    env = {"DOCKYARD_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin", "DOCKYARD_TEMPLATES__COMPUTER__POOL__MIN": "0"}
    heard = Heard()
    params = StdioServerParameters(command=DOCKYARD, args=["serve"], env=env)
    async with Client(params, mode="legacy", message_handler=heard.handler) as client:
        assert client.protocol_version == "2025-11-25"
        assert client.server_capabilities.resources is not None
        assert client.server_capabilities.resources.subscribe is True
        uri = await dispatched(client, "echo over-stdio")
        await client.subscribe_resource(uri)
        status = None
        with anyio.fail_after(120):
            while status != "completed":
                await heard.next(uri)
                status = json.loads((await client.read_resource(uri)).contents[0].text)["status"]

        sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
        sandbox = f"dockyard://sandboxes/{sandbox_id}"
        await client.subscribe_resource(sandbox)
        container = sandbox_row(make_settings(data_dir), sandbox_id).container_id
        docker_client.containers.get(container).kill()  # from outside dockyard
        await heard.next(sandbox, 60)
        assert json.loads((await client.read_resource(sandbox)).contents[0].text)["status"] == "lost"


async def test_every_handshake_version_and_2026_advertise_subscribe(served: Served) -> None:
    ann = await mint(served, scopes=DISPATCH, workspace_id="a")
    for version in HANDSHAKE_VERSIONS:
        result = initialize(served, ann["token"], version)
        assert result["protocolVersion"] == version
        assert result["capabilities"]["resources"]["subscribe"] is True, (version, result["capabilities"])
    async with connect(served, ann["token"]) as modern:  # discovers 2026-07-28: subscriptions/listen
        assert modern.protocol_version == "2026-07-28"
        assert modern.server_capabilities.resources is not None
        assert modern.server_capabilities.resources.subscribe is True


async def test_a_2025_http_session_hears_its_dispatch_complete(served: Served) -> None:
    ann = await mint(served, scopes=DISPATCH, workspace_id="a")
    async with legacy(served, ann["token"]) as (client, heard):
        uri = await dispatched(client, "sleep 1; echo over-http")
        await client.subscribe_resource(uri)
        status = None
        with anyio.fail_after(120):
            while status != "completed":
                await heard.next(uri)
                status = json.loads((await client.read_resource(uri)).contents[0].text)["status"]


async def test_workspace_b_cannot_subscribe_to_a_dispatch_of_a_and_hears_nothing_of_it(served: Served) -> None:
    ann = await mint(served, scopes=DISPATCH, workspace_id="a", user_id="user")
    bob = await mint(served, scopes=DISPATCH, workspace_id="b", user_id="user")  # the same user name
    async with legacy(served, ann["token"]) as (client_a, heard_a), legacy(served, bob["token"]) as (client_b, heard_b):
        uri = await dispatched(client_a, "sleep 2; echo secret")
        dispatch_id = uri.rsplit("/", 1)[1]
        ghost = "dsp_" + "0" * (len(dispatch_id) - 4)
        await client_a.subscribe_resource(uri)
        with pytest.raises(MCPError) as refused:
            await client_b.subscribe_resource(uri)
        with pytest.raises(MCPError) as unknown:
            await client_b.subscribe_resource(f"dockyard://dispatches/{ghost}")
        # The same words as for an id that never was: nothing says the dispatch exists.
        assert refused.value.error.message == unknown.value.error.message.replace(ghost, dispatch_id)
        assert f"unknown dispatch '{dispatch_id}'" in refused.value.error.message
        await heard_a.next(uri)  # the owner hears it
        done = await call(client_a, "await_dispatch", dispatch_id=uri.rsplit("/", 1)[1], timeout_s=120)
        assert done["status"] == "completed"
        assert await heard_b.quiet(uri, 1) and heard_b.uris == []


async def test_a_token_without_dispatch_read_or_revoked_since_hears_nothing_of_the_workspaces_dispatch(
    served: Served,
) -> None:
    ann = await mint(served, scopes=[*DISPATCH, "token:mint"], workspace_id="a")
    blind = await mint(served, scopes=["dispatch:create"], workspace_id="a")
    async with connect(served, ann["token"]) as minter:
        later = await call(minter, "token_mint", scopes=["dispatch:read"])
    async with (
        legacy(served, ann["token"]) as (client, heard),
        legacy(served, blind["token"]) as (blind_client, blind_heard),
        legacy(served, later["token"]) as (later_client, later_heard),
    ):
        uri = await dispatched(client, "sleep 3; echo ok")
        await client.subscribe_resource(uri)
        with pytest.raises(MCPError, match="dispatch:read"):
            await blind_client.subscribe_resource(uri)
        await later_client.subscribe_resource(uri)  # allowed now ...
        async with connect(served, served.admin_key) as admin:
            await call(admin, "token_revoke", token_id=later["token_id"])  # ... and revoked
        done = await call(client, "await_dispatch", dispatch_id=uri.rsplit("/", 1)[1], timeout_s=120)
        assert done["status"] == "completed"
        await heard.next(uri)
        assert await later_heard.quiet(uri, 1) and later_heard.uris == []
        assert blind_heard.uris == []


async def test_workspace_b_cannot_subscribe_to_a_team_of_a_or_its_inbox(served: Served) -> None:
    ann = await mint(served, scopes=TEAM, workspace_id="a")
    bob = await mint(served, scopes=TEAM, workspace_id="b")
    async with legacy(served, ann["token"]) as (client_a, heard_a), legacy(served, bob["token"]) as (client_b, heard_b):
        team_id = (await call(client_a, "team_create", name="ours"))["team_id"]
        for uri in (f"dockyard://teams/{team_id}", f"dockyard://teams/{team_id}/inbox"):
            await client_a.subscribe_resource(uri)
            with pytest.raises(MCPError, match=f"unknown team '{team_id}'"):
                await client_b.subscribe_resource(uri)
        await call(client_a, "team_add_tasks", team_id=team_id, tasks=[{"title": "a secret plan"}])
        await heard_a.next(f"dockyard://teams/{team_id}", 30)  # the lead hears it
        assert await heard_b.quiet(f"dockyard://teams/{team_id}", 1) and heard_b.uris == []


async def test_a_subscription_hears_nothing_once_its_token_has_expired(served: Served) -> None:
    ann = await mint(served, scopes=DISPATCH, workspace_id="a")
    async with legacy(served, ann["token"]) as (client, heard):
        uri = await dispatched(client, "sleep 8; echo late")
        dispatch_id = uri.rsplit("/", 1)[1]
        with anyio.fail_after(60):
            while (await call(client, "await_dispatch", dispatch_id=dispatch_id, timeout_s=0))["status"] != "running":
                await anyio.sleep(0.2)
        await client.subscribe_resource(uri)
        brief = await mint(served, scopes=["dispatch:read"], workspace_id="a", ttl_s=2)
        async with legacy(served, brief["token"]) as (short_client, short_heard):
            await short_client.subscribe_resource(uri)
            await heard.next(uri, 60)  # completed, after the brief token expired
            assert (await call(client, "await_dispatch", dispatch_id=dispatch_id, timeout_s=0))["status"] == "completed"
            assert await short_heard.quiet(uri, 1) and short_heard.uris == []


async def test_the_team_inbox_and_sandbox_resources_are_unreadable_from_another_workspace_or_a_revoked_token(
    served: Served,
) -> None:
    scopes = [*TEAM, "sandbox:create", "sandbox:exec", "sandbox:files"]
    ann = await mint(served, scopes=scopes, workspace_id="a")
    bob = await mint(served, scopes=scopes, workspace_id="b")
    gone = await mint(served, scopes=scopes, workspace_id="a")
    async with connect(served, served.admin_key) as admin:
        await call(admin, "token_revoke", token_id=gone["token_id"])
    async with connect(served, ann["token"]) as client_a, connect(served, bob["token"]) as client_b:
        team_id = (await call(client_a, "team_create", name="ours"))["team_id"]
        sandbox_id = (await call(client_a, "sandbox_create"))["sandbox_id"]
        uris = [
            f"dockyard://teams/{team_id}",
            f"dockyard://teams/{team_id}/inbox",
            f"dockyard://sandboxes/{sandbox_id}",
        ]
        for uri in uris:
            assert (await client_a.read_resource(uri)).contents  # the owner reads it
            with pytest.raises(MCPError, match="unknown"):
                await client_b.read_resource(uri)
        with pytest.raises(MCPError, match="unknown"):
            await client_a.read_resource("dockyard://sandboxes/sbx_0000000000000000")
    with pytest.raises(Exception):  # noqa: B017 - a revoked token does not even get a session
        async with connect(served, gone["token"]) as client_gone:
            await client_gone.read_resource(uris[0])
