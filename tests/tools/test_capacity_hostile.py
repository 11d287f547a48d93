"""Hostile tenants against capacity, over `dockyard serve --http` with real tokens: a workspace
that grabs a whole pool, floods it with dispatches, or fans a run out into children to get
past the limits that keep room for everyone else."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import anyio
import pytest
from mcp import Client
from sqlmodel import Session, create_engine, select

from dockyard.runtime.substrate.store import AuditEvent, Dispatch, DispatchDecision, Member, Sandbox
from tests.conftest import call
from tests.served import Served, connect, mint

pytestmark = pytest.mark.anyio

WORK = ["sandbox:create", "sandbox:exec", "sandbox:files", "dispatch:create", "dispatch:read", "pool:read"]


@asynccontextmanager
async def tenant(served: Served, workspace: str, scopes: list[str] = WORK) -> AsyncIterator[Client]:
    """The official client over HTTP with a token of `workspace` minted by the admin key."""
    minted = await mint(served, scopes=scopes, workspace_id=workspace, user_id=f"user-{workspace}")
    async with connect(served, minted["token"]) as client:
        yield client


def rows(served: Served, model: type, *where: Any) -> list:
    with Session(create_engine(f"sqlite:///{served.data_dir / 'dockyard.db'}")) as session:
        return list(session.exec(select(model).where(*where)).all())


def most_at_once(sandboxes: Iterable[Sandbox]) -> int:
    """The most of these sandboxes that were running at the same moment."""
    edges: list[tuple[datetime, int]] = []
    for sandbox in sandboxes:
        edges.append((sandbox.created_at.replace(tzinfo=None), 1))
        edges.append(((sandbox.ended_at or datetime.max).replace(tzinfo=None), -1))
    held = most = 0
    for _, step in sorted(edges):  # an end sorts before a start at the same instant
        held += step
        most = max(most, held)
    return most


async def pool(client: Client) -> dict[str, Any]:
    return next(p for p in (await call(client, "pool_status"))["pools"] if p["template"] == "default")


async def until_pool(client: Client, done: Any, timeout_s: float = 60) -> dict[str, Any]:
    with anyio.fail_after(timeout_s):
        while not done(info := await pool(client)):
            await anyio.sleep(0.1)
    return info


def send(client: Client, script: str, summary: str = "a job") -> Any:
    return client.call_tool(
        "dispatch", {"mode": "remote", "rationale": "a job of mine", "task_summary": summary, "prompt": script}
    )


# -- a pool shared fairly -------------------------------------------------------------------


async def test_workspace_a_creating_all_it_can_still_leaves_workspace_b_a_sandbox_of_the_pool(serve_http: Any) -> None:
    served = serve_http(env={"POOL_MAX": "4", "DOCKYARD_POOL__CLAIM_TIMEOUT_S": "3"})
    async with tenant(served, "a") as a, tenant(served, "b") as b:
        held: list[str] = []
        refusal = None
        for _ in range(6):  # more than the pool holds: A keeps creating until it is refused
            result = await a.call_tool("sandbox_create", {})
            if result.is_error:
                refusal = result.content[0].text
                break
            held.append(result.structured_content["sandbox_id"])
        assert len(held) == 3 == (await pool(a))["workspace_share"], held  # its share of a pool of four
        assert (
            refusal is not None and "quota workspace_pool_share reached" in refusal and "share: 3 of max 4" in refusal
        ), refusal
        with anyio.fail_after(30):
            theirs = await call(b, "sandbox_create")  # within the claim timeout of 3 s
        assert (await call(b, "sandbox_exec", sandbox_id=theirs["sandbox_id"], command="echo mine"))[
            "stdout"
        ] == "mine\n"
    running = rows(served, Sandbox, Sandbox.status == "running")
    assert sorted(s.workspace_id for s in running) == ["a", "a", "a", "b"]
    refused = [e for e in rows(served, AuditEvent, AuditEvent.kind == "sandbox.create") if e.outcome != "ok"]
    assert [e.workspace_id for e in refused] == ["a"] and "workspace_pool_share" in refused[0].detail


async def test_workspace_a_queueing_claims_behind_its_share_cannot_keep_workspace_b_waiting(serve_http: Any) -> None:
    """A holds its share and queues three more claims before B asks: B is served at once, A's
    first queued claim only when A gives one back, and A's others are refused naming the quota."""
    served = serve_http(env={"POOL_MAX": "4", "DOCKYARD_POOL__CLAIM_TIMEOUT_S": "8"})
    async with tenant(served, "a") as a, tenant(served, "b") as b:
        mine = [(await call(a, "sandbox_create"))["sandbox_id"] for _ in range(3)]
        queued: list[Any] = []

        async def claim() -> None:
            queued.append(await a.call_tool("sandbox_create", {}))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(claim)
            await until_pool(a, lambda p: p["claimed"] + p["queue_depth"] >= 6, timeout_s=20)
            with anyio.fail_after(6):  # well inside A's queued claims' timeout
                theirs = await call(b, "sandbox_create")
            assert theirs["status"] == "running"
            assert queued == []  # B went first although A asked first
            await call(a, "sandbox_destroy", sandbox_id=mine.pop())
        served_a = [r.structured_content["sandbox_id"] for r in queued if not r.is_error]
        refused = [r.content[0].text for r in queued if r.is_error]
        assert len(served_a) == 1 and len(refused) == 2, queued
        assert all("quota workspace_pool_share reached" in text and "'a' holds 3" in text for text in refused), refused
    a_sandboxes = rows(served, Sandbox, Sandbox.workspace_id == "a")
    assert len(a_sandboxes) == 4 and most_at_once(a_sandboxes) == 3


async def test_a_burst_of_dispatches_from_workspace_a_runs_share_at_a_time_all_complete_and_b_is_served_meanwhile(
    serve_http: Any,
) -> None:
    served = serve_http(env={"POOL_MAX": "4", "DOCKYARD_POOL__CLAIM_TIMEOUT_S": "60"})
    async with tenant(served, "a") as a, tenant(served, "b") as b:
        sent = [await send(a, f"sleep 8; echo a-{n}") for n in range(6)]  # long enough that B is served before any ends
        ids = [r.structured_content["dispatch_id"] for r in sent]
        await until_pool(a, lambda p: p["claimed"] + p["queue_depth"] >= 6, timeout_s=30)
        theirs = await call(b, "sandbox_create")
        finished = [d for d in rows(served, Dispatch, Dispatch.workspace_id == "a") if d.finished_at is not None]
        assert finished == []  # B did not wait for any of A's work to end
        with anyio.fail_after(180):
            results = [await call(a, "await_dispatch", dispatch_id=i, timeout_s=120) for i in ids]
        assert [(r["status"], r["result"]) for r in results] == [("completed", f"a-{n}\n") for n in range(6)]
        await call(b, "sandbox_destroy", sandbox_id=theirs["sandbox_id"])
    a_sandboxes = rows(served, Sandbox, Sandbox.workspace_id == "a")
    assert len(a_sandboxes) == 6 and most_at_once(a_sandboxes) <= 3


# -- dispatches per minute ------------------------------------------------------------------


async def test_workspace_a_flooding_dispatches_past_its_rate_is_refused_naming_the_quota_and_b_is_unaffected(
    serve_http: Any,
) -> None:
    served = serve_http(env={"POOL_MAX": "4", "DOCKYARD_QUOTAS__DISPATCHES_PER_MINUTE": "5"})
    async with tenant(served, "a") as a, tenant(served, "b") as b:
        outcomes = [await send(a, f"echo a-{n}") for n in range(8)]
        accepted = [r.structured_content["dispatch_id"] for r in outcomes if not r.is_error]
        refusals = [r.content[0].text for r in outcomes if r.is_error]
        assert len(accepted) == 5 and len(refusals) == 3
        assert all("quota dispatches_per_minute reached" in text and "the limit is 5" in text for text in refusals), (
            refusals
        )
        theirs = [
            (await call(b, "dispatch", mode="remote", rationale="mine", task_summary="b", prompt=f"echo b-{n}"))[
                "dispatch_id"
            ]
            for n in range(5)
        ]
        with anyio.fail_after(180):
            for client, ids in ((a, accepted), (b, theirs)):
                for dispatch_id in ids:
                    assert (await call(client, "await_dispatch", dispatch_id=dispatch_id, timeout_s=120))[
                        "status"
                    ] == "completed"
    assert len(rows(served, Dispatch, Dispatch.workspace_id == "a")) == 5
    decisions = rows(served, DispatchDecision, DispatchDecision.workspace_id == "a")
    assert sorted(d.outcome for d in decisions) == ["accepted"] * 5 + ["refused"] * 3
    assert all("dispatches_per_minute" in (d.reason or "") for d in decisions if d.outcome == "refused")
    audited = [e for e in rows(served, AuditEvent, AuditEvent.kind == "dispatch.create") if e.outcome != "ok"]
    assert [e.workspace_id for e in audited] == ["a"] * 3 and all("dispatches_per_minute" in e.detail for e in audited)


async def test_racing_dispatches_from_three_sessions_of_workspace_a_cannot_overshoot_its_rate(serve_http: Any) -> None:
    served = serve_http(env={"POOL_MAX": "4", "DOCKYARD_QUOTAS__DISPATCHES_PER_MINUTE": "5"})
    outcomes: list[Any] = []
    async with tenant(served, "a") as one, tenant(served, "a") as two, tenant(served, "a") as three:

        async def one_dispatch(client: Client, n: int) -> None:
            outcomes.append(await send(client, f"echo {n}"))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for n in range(5):
                    for client in (one, two, three):
                        tg.start_soon(one_dispatch, client, n)
        accepted = [r.structured_content["dispatch_id"] for r in outcomes if not r.is_error]
        assert len(outcomes) == 15 and len(accepted) == 5, [r.content[0].text for r in outcomes if r.is_error][:3]
        assert all("dispatches_per_minute" in r.content[0].text for r in outcomes if r.is_error)
        with anyio.fail_after(180):
            for dispatch_id in accepted:
                await call(one, "await_dispatch", dispatch_id=dispatch_id, timeout_s=120)
    assert len(rows(served, Dispatch, Dispatch.workspace_id == "a")) == 5


# -- a run's limits over its whole tree -----------------------------------------------------

# A member's script: dispatch children through the bridge with the member's own token, then
# wait for them all and print what became of each.
FAN_OUT = """/opt/dockyard/client/bin/python - <<'PY'
import json, os
import anyio
from mcp import Client, StdioServerParameters

async def main():
    bridge = StdioServerParameters(command="dockyard-bridge", env={"DOCKYARD_TOKEN": os.environ["DOCKYARD_TOKEN"]})
    async with Client(bridge) as client:
        sent = []
        for n in range(4):
            result = await client.call_tool("dispatch", {"mode": "remote", "rationale": "fan out", "task_summary": f"child {n}",
                                                         "prompt": f"sleep 4; echo child-{n}"})
            sent.append(result.structured_content["dispatch_id"] if not result.is_error else result.content[0].text)
        done = []
        for dispatch_id in sent:
            result = await client.call_tool("await_dispatch", {"dispatch_id": dispatch_id, "timeout_s": 120})
            done.append(result.structured_content if not result.is_error else {"error": result.content[0].text})
        print(json.dumps(done))

anyio.run(main)
PY
"""


async def test_a_member_limited_to_two_sandboxes_cannot_hold_more_by_fanning_out_child_dispatches(
    serve_http: Any,
) -> None:
    served = serve_http(env={"POOL_MAX": "8", "DOCKYARD_QUOTAS__RUN_SANDBOXES": "2"})
    async with tenant(served, "a", [*WORK, "team:lead"]) as lead:
        team = (await call(lead, "team_create", name="fan"))["team_id"]
        member_id = (await call(lead, "team_spawn", team_id=team, role="orchestrator", prompt=FAN_OUT))["member_id"]
        with anyio.fail_after(240):
            while (view := await call(lead, "team_tasks", team_id=team))["members"][0]["turns"] < 1 or view["members"][
                0
            ]["status"] != "idle":
                await anyio.sleep(0.3)
        member = view["members"][0]
        assert member["last_error"] is None, member["last_error"]
        children = json.loads(member["last_output"])
        completed = [c for c in children if c.get("status") == "completed"]
        refused = [c for c in children if c.get("status") == "failed"]
        assert completed and refused, children
        assert all(
            "quota run_sandboxes reached" in c["error"] and f"run '{member_id}'" in c["error"] for c in refused
        ), refused
        await call(lead, "team_shutdown", team_id=team)
    child_ids = {d.id for d in rows(served, Dispatch, Dispatch.run_id == member_id)}
    assert len(child_ids) == 4
    tree = rows(served, Sandbox, Sandbox.workspace_id == "a")
    assert {s.run_id for s in tree} <= child_ids | {member_id}
    assert most_at_once(tree) <= 2  # the member's own sandbox and one child's, never more
    assert rows(served, Member, Member.id == member_id)
