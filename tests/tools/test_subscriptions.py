"""resources/subscribe on the handshake protocol (2025-11-25) through the official client, and
subscriptions/listen on 2026-07-28, for dispatches, teams and sandboxes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import pytest
from mcp import Client, types
from mcp.client.session import IncomingMessage
from mcp.shared.exceptions import MCPError

from dockyard.runtime.substrate.settings import Settings
from dockyard.server.app import build_server
from dockyard.server.bus import MAX_SESSION_SUBSCRIPTIONS
from tests.conftest import call

pytestmark = [
    pytest.mark.anyio,
    # the SDK's client warns that 2026-07-28 drops resources/subscribe; these sessions are 2025's
    pytest.mark.filterwarnings("ignore:resources/(un)?subscribe is removed as of 2026-07-28"),
]


class Heard:
    """The `notifications/resources/updated` a client received, as they come."""

    def __init__(self) -> None:
        self.uris: list[str] = []
        self._send, self._receive = anyio.create_memory_object_stream[str](1000)

    async def handler(self, message: IncomingMessage) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            self.uris.append(message.params.uri)
            await self._send.send(message.params.uri)

    async def next(self, uri: str, timeout_s: float = 120) -> None:
        """Wait for an update of `uri` (others may come between)."""
        with anyio.fail_after(timeout_s):
            while await self._receive.receive() != uri:
                pass

    async def quiet(self, uri: str, seconds: float) -> bool:
        """Whether no update of `uri` comes within `seconds`."""
        with anyio.move_on_after(seconds):
            while await self._receive.receive() != uri:
                pass
            return False
        return True


@asynccontextmanager
async def legacy(settings: Settings) -> AsyncIterator[tuple[Client, Heard]]:
    """The official client on the initialize handshake (2025-11-25), in process."""
    heard = Heard()
    async with Client(build_server(settings), mode="legacy", message_handler=heard.handler) as client:
        assert client.protocol_version == "2025-11-25"
        yield client, heard


async def read(client: Client, uri: str) -> dict[str, Any]:
    contents = (await client.read_resource(uri)).contents[0]
    assert isinstance(contents, types.TextResourceContents)
    return json.loads(contents.text)


async def dispatch(client: Client, script: str) -> str:
    sent = await call(client, "dispatch", mode="remote", rationale="a test", task_summary="t", prompt=script)
    return sent["dispatch_id"]


async def test_a_2025_session_hears_its_dispatch_complete_and_nothing_once_unsubscribed(
    settings: Settings, cleanup: None
) -> None:
    async with legacy(settings) as (client, heard):
        assert client.server_capabilities.resources is not None
        assert client.server_capabilities.resources.subscribe is True
        uri = f"dockyard://dispatches/{await dispatch(client, 'sleep 1; echo via-subscription')}"
        for _ in range(50):  # a flood of the same subscription is one subscription
            await client.subscribe_resource(uri)
        state: dict[str, Any] = {}
        with anyio.fail_after(120):
            while state.get("status") != "completed":
                await heard.next(uri)  # woken, never polled
                state = await read(client, uri)
        assert state["result"] == "via-subscription\n"

        second = f"dockyard://dispatches/{await dispatch(client, 'sleep 2; echo later')}"
        await client.subscribe_resource(second)
        await client.unsubscribe_resource(second)
        await client.unsubscribe_resource(second)  # twice is no error
        done = await call(client, "await_dispatch", dispatch_id=second.rsplit("/", 1)[1], timeout_s=120)
        assert done["status"] == "completed"
        assert await heard.quiet(second, 1)
        assert second not in heard.uris


async def test_a_team_inbox_and_the_team_tell_the_lead_when_a_member_is_messaged_and_takes_it(
    settings: Settings, cleanup: None
) -> None:
    async with legacy(settings) as (client, heard):
        team = (await call(client, "team_create", name="pair"))["team_id"]
        inbox, board = f"dockyard://teams/{team}/inbox", f"dockyard://teams/{team}"
        await client.subscribe_resource(inbox)
        await client.subscribe_resource(board)
        await call(client, "team_spawn", team_id=team, role="dev", prompt="cat >/dev/null; echo turn-done")
        await heard.next(board)  # the member joined
        with anyio.fail_after(120):
            while (await read(client, board))["members"][0]["status"] != "idle":
                await heard.next(board)
        await call(client, "team_message", team_id=team, to="dev", body="please look at it")
        await heard.next(inbox)
        sent = (await read(client, inbox))["sent"]
        assert [(m["recipient"], m["body"]) for m in sent] == [("dev", "please look at it")]
        with anyio.fail_after(120):  # the member's turn takes it: the receipt changes the inbox again
            while not (await read(client, inbox))["sent"][0]["delivered"]:
                await heard.next(inbox)


async def test_a_sandbox_subscription_hears_its_destruction_and_the_resource_says_destroyed(
    settings: Settings, cleanup: None
) -> None:
    async with legacy(settings) as (client, heard):
        sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
        uri = f"dockyard://sandboxes/{sandbox_id}"
        assert (await read(client, uri))["status"] == "running"
        await client.subscribe_resource(uri)
        await call(client, "sandbox_destroy", sandbox_id=sandbox_id)
        await heard.next(uri, 30)
        assert (await read(client, uri))["status"] == "destroyed"


async def test_a_subscription_to_what_dockyard_does_not_serve_or_does_not_know_is_refused(
    settings: Settings, cleanup: None
) -> None:
    async with legacy(settings) as (client, _):
        for uri, why in [
            ("dockyard://dispatches/dsp_nope", "unknown dispatch 'dsp_nope'"),
            ("dockyard://teams/team_nope/inbox", "unknown team 'team_nope'"),
            ("dockyard://sandboxes/sbx_nope", "unknown sandbox 'sbx_nope'"),
            ("dockyard://elsewhere/x", "subscribable: dockyard://dispatches/{id}"),
            ("file:///etc/passwd", "no such resource"),
        ]:
            with pytest.raises(MCPError, match=f"cannot subscribe to '{uri}'.*{why}".replace("{", r"\{")):
                await client.subscribe_resource(uri)


async def test_the_2026_listen_path_hears_sandboxes_and_has_no_resources_subscribe(client: Client) -> None:
    assert client.protocol_version == "2026-07-28"
    assert client.server_capabilities.resources is not None
    assert client.server_capabilities.resources.subscribe is True  # through subscriptions/listen
    sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
    uri = f"dockyard://sandboxes/{sandbox_id}"
    async with client.listen(resource_subscriptions=[uri]) as changes:
        await call(client, "sandbox_destroy", sandbox_id=sandbox_id)
        with anyio.fail_after(30):
            async for _ in changes:
                break
    assert (await read(client, uri))["status"] == "destroyed"
    with pytest.raises(MCPError, match="Method not found"):
        await client.subscribe_resource(uri)


async def test_a_flood_of_subscriptions_is_capped_per_session_with_a_message_saying_what_to_do(
    settings: Settings, cleanup: None
) -> None:
    async with legacy(settings) as (client, _):
        uris: list[str] = []
        while len(uris) <= MAX_SESSION_SUBSCRIPTIONS:
            team = (await call(client, "team_create", name=f"t{len(uris)}"))["team_id"]
            uris += [f"dockyard://teams/{team}", f"dockyard://teams/{team}/inbox"]
        for uri in uris[:MAX_SESSION_SUBSCRIPTIONS]:
            await client.subscribe_resource(uri)
        with pytest.raises(MCPError, match=f"already holds {MAX_SESSION_SUBSCRIPTIONS} subscriptions.*unsubscribe"):
            await client.subscribe_resource(uris[MAX_SESSION_SUBSCRIPTIONS])
        await client.unsubscribe_resource(uris[0])
        await client.subscribe_resource(uris[MAX_SESSION_SUBSCRIPTIONS])  # room again
    async with legacy(settings) as (client, _):  # another session holds none of the first's
        await client.subscribe_resource(uris[0])
