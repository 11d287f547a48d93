"""The subscription bus's 2025-era side: per-session subscriptions, who hears what, the cap
per session, and nothing kept once a session closes. The session is the SDK's own
`Connection`, over a wire that records what the client would receive."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import pytest
from mcp.server.connection import Connection
from mcp.shared.subscriptions import ResourceUpdated

from dockyard.runtime.substrate.settings import Identity
from dockyard.server.bus import MAX_SESSION_SUBSCRIPTIONS, SubscriptionLimitError, WorkspaceBus

pytestmark = pytest.mark.anyio

URI = "dockyard://dispatches/dsp_1"
ANN = Identity(workspace_id="a", user_id="ann", scopes=["dispatch:read"], token_id="tok_ann")


class _Wire:
    """What a client on the other end of a session receives."""

    def __init__(self) -> None:
        self.updated: list[str] = []
        self.reading = anyio.Event()  # a client that reads at once; clear it to stall the client
        self.reading.set()

    async def send_raw_request(self, method: str, params: Mapping[str, Any] | None, opts: Any = None) -> dict:
        raise AssertionError("the bus sends no requests")

    async def notify(self, method: str, params: Mapping[str, Any] | None, opts: Any = None) -> None:
        assert method == "notifications/resources/updated"
        self.updated.append((params or {})["uri"])
        await self.reading.wait()


def _session() -> tuple[Connection, _Wire]:
    wire = _Wire()
    return Connection(wire, protocol_version="2025-11-25"), wire


async def _settle() -> None:
    for _ in range(5):
        await anyio.sleep(0.01)


def _reads(who: Identity) -> bool:
    return who.allows("dispatch:read")


async def test_a_change_reaches_a_subscribed_session_of_its_workspace_and_a_stalled_client_holds_up_nobody() -> None:
    bus = WorkspaceBus(Identity())
    async with bus.serving():
        mine, heard = _session()
        other, elsewhere = _session()
        bus.add(mine, ANN, URI)
        bus.add(other, ANN.model_copy(update={"workspace_id": "b"}), URI)
        heard.reading = anyio.Event()  # the client stalls on the first notification
        for _ in range(20):
            await bus.publish_to("a", _reads, ResourceUpdated(uri=URI))  # the publisher is never held up
        await _settle()
        heard.reading.set()
        await _settle()
        assert heard.updated == [URI, URI]  # what changed while it stalled comes as one wake-up
        assert elsewhere.updated == []  # the same id subscribed from workspace b hears nothing
        await bus.publish_to("a", _reads, ResourceUpdated(uri="dockyard://dispatches/dsp_2"))
        await _settle()
        assert heard.updated == [URI, URI]  # only what it subscribed to


async def test_unsubscribing_revoking_and_closing_each_stop_the_notifications() -> None:
    bus = WorkspaceBus(Identity())
    async with bus.serving():
        first, heard_first = _session()
        second, heard_second = _session()
        third, heard_third = _session()
        bus.add(first, ANN, URI)
        bus.add(second, ANN.model_copy(update={"token_id": "tok_other"}), URI)
        bus.add(third, ANN.model_copy(update={"token_id": "tok_third"}), URI)
        assert bus.remove(first, URI) and not bus.remove(first, URI)
        bus.revoked({"tok_other"})
        await third.exit_stack.aclose()  # the session ends
        assert bus.held(first) == bus.held(second) == bus.held(third) == []
        await bus.publish_to("a", _reads, ResourceUpdated(uri=URI))
        await _settle()
        assert heard_first.updated == heard_second.updated == heard_third.updated == []


async def test_a_session_holds_at_most_the_cap_and_subscribing_twice_counts_once() -> None:
    bus = WorkspaceBus(Identity())
    async with bus.serving():
        session, _ = _session()
        for n in range(MAX_SESSION_SUBSCRIPTIONS):
            bus.add(session, ANN, f"dockyard://dispatches/dsp_{n}")
        bus.add(session, ANN, "dockyard://dispatches/dsp_0")  # again: no new subscription
        with pytest.raises(SubscriptionLimitError, match=f"{MAX_SESSION_SUBSCRIPTIONS} subscriptions"):
            bus.add(session, ANN, "dockyard://dispatches/dsp_one_more")
        assert len(bus.held(session)) == MAX_SESSION_SUBSCRIPTIONS
        await session.exit_stack.aclose()
        assert bus.held(session) == []
        fresh, _ = _session()  # another session starts from nothing
        bus.add(fresh, ANN, "dockyard://dispatches/dsp_one_more")
