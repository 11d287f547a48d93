"""Hostile callers against the discovery tools: another workspace's token, a sandbox's own
token, a dispatch's runner, forged and borrowed cursors. Listing never reaches past the
caller's own rows, and a refusal changes nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mcp import Client

from tests.conftest import call, call_error, sh
from tests.served import Served, connect, mint

pytestmark = pytest.mark.anyio

WORKER = ["sandbox:create", "sandbox:exec", "sandbox:files", "dispatch:create", "dispatch:read", "team:lead"]


async def listed(client: Client) -> dict[str, list[str]]:
    """Every id the three lists show the caller."""
    return {
        "dispatches": [d["dispatch_id"] for d in (await call(client, "dispatch_list", limit=100))["dispatches"]],
        "teams": [t["team_id"] for t in (await call(client, "team_list", limit=100))["teams"]],
        "snapshots": [s["snapshot_id"] for s in (await call(client, "snapshot_list", limit=100))["snapshots"]],
    }


async def test_workspace_b_sees_and_counts_nothing_of_workspace_a_and_cannot_borrow_its_cursors(served: Served) -> None:
    a = await mint(served, scopes=WORKER, workspace_id="a", user_id="ann")
    b = await mint(served, scopes=WORKER, workspace_id="b", user_id="ann")  # the same user name, another workspace
    async with connect(served, a["token"]) as client_a, connect(served, b["token"]) as client_b:
        sandbox_id = (await call(client_a, "sandbox_create"))["sandbox_id"]
        await call(client_a, "sandbox_snapshot", sandbox_id=sandbox_id)
        for n in range(2):
            await call(client_a, "dispatch", mode="remote", rationale="r", task_summary=f"a's {n}", prompt="echo a")
            await call(client_a, "team_create", name=f"a's team {n}")
        before = await listed(client_a)
        assert [len(ids) for ids in before.values()] == [2, 2, 1]

        assert await listed(client_b) == {"dispatches": [], "teams": [], "snapshots": []}
        quotas = {q["name"]: q["used"] for q in (await call(client_b, "capabilities"))["quotas"]}
        assert quotas["workspace_sandboxes"] == quotas["user_sandboxes"] == quotas["dispatches_per_minute"] == 0
        assert quotas["workspace_snapshot_mb"] == 0 and quotas["tenant_sandboxes"] is None
        # a's cursors are a's: presented by b they are refused, not read as a position in a's rows.
        for tool in ("dispatch_list", "team_list"):
            cursor = (await call(client_a, tool, limit=1))["next_cursor"]
            assert cursor and f"not one {tool} gave you" in await call_error(client_b, tool, cursor=cursor)
        assert "dispatch_list gave you" in await call_error(client_b, "dispatch_list", cursor="x" * 2000)
        assert "2048" in await call_error(client_b, "dispatch_list", cursor="x" * 5000)
        assert await listed(client_a) == before  # nothing changed for a
    async with connect(served, served.admin_key) as admin:
        assert (await call(admin, "audit_verify"))["intact"] is True


async def test_a_token_without_the_scopes_sees_no_modes_runners_or_computers_and_cannot_list_dispatches(
    served: Served,
) -> None:
    narrow = await mint(served, scopes=["sandbox:exec"], workspace_id="a")
    async with connect(served, narrow["token"]) as client:
        offered = await call(client, "capabilities")
        assert (offered["modes"], offered["runners"]) == ([], [])
        assert {t["kind"] for t in offered["templates"]} == {"sandbox"}
        assert {q["name"] for q in offered["quotas"]} >= {"workspace_sandboxes"}
        assert not any("computers" in q["name"] or "dispatch" in q["name"] for q in offered["quotas"])
        assert "needs the scope 'dispatch:read'" in await call_error(client, "dispatch_list")
        assert "team:lead" in await call_error(client, "team_list")
    async with connect(served, served.admin_key) as admin:
        rows = (await call(admin, "audit_query", workspace_id="a", kind="dispatch.list"))["rows"]
        assert [(row["outcome"], row["token_id"]) for row in rows] == [("denied", narrow["token_id"])]
        assert (await call(admin, "capabilities"))["notice"].startswith("the admin key only mints")


async def test_a_sandboxs_own_token_lists_only_that_sandboxs_snapshots(client: Client) -> None:
    here = (await call(client, "sandbox_create"))["sandbox_id"]
    there = (await call(client, "sandbox_create"))["sandbox_id"]
    mine = (await call(client, "sandbox_snapshot", sandbox_id=here))["snapshot_id"]
    await call(client, "sandbox_snapshot", sandbox_id=there)

    async def inside(command: str) -> dict[str, Any]:
        ran = await sh(client, here, command, timeout_s=60)
        assert ran["exit_code"] == 0, ran["stderr"]
        return json.loads(ran["stdout"])

    assert [s["snapshot_id"] for s in (await inside("dockyard-call snapshot_list"))["snapshots"]] == [mine]
    asked = json.dumps({"sandbox_id": there})
    assert (await inside(f"dockyard-call snapshot_list '{asked}'"))["snapshots"] == []
    offered = await inside("dockyard-call capabilities")
    assert (offered["modes"], offered["runners"]) == ([], []) and offered["bridge"]["command"] == "dockyard-bridge"
    refused = await sh(client, here, "dockyard-call dispatch_list", timeout_s=60)
    assert refused["exit_code"] == 1 and "dispatch:read" in refused["stderr"], refused
    assert len((await call(client, "snapshot_list"))["snapshots"]) == 2  # the owner still sees both


async def test_a_dispatchs_runner_lists_its_own_run_and_not_the_workspaces_other_dispatches(client: Client) -> None:
    other = await call(client, "dispatch", mode="remote", rationale="r", task_summary="other", prompt="echo other")
    runner = await call(
        client, "dispatch", mode="remote", rationale="r", task_summary="lister", prompt="dockyard-call dispatch_list"
    )
    done = await call(client, "await_dispatch", dispatch_id=runner["dispatch_id"], timeout_s=120)
    assert done["status"] == "completed", done
    seen = [d["dispatch_id"] for d in json.loads(done["result"])["dispatches"]]
    assert seen == [runner["dispatch_id"]], seen
    everything = [d["dispatch_id"] for d in (await call(client, "dispatch_list"))["dispatches"]]
    assert set(everything) == {other["dispatch_id"], runner["dispatch_id"]}
