"""Hostile tenants against dockyard's authority, over HTTP with real tokens: forged bindings,
revocation that must cascade and reach open sessions, notifications that must not cross
workspaces, sessions that belong to their token, and users of one workspace who must not end
each other's work.

Each test plays the attacker through the official MCP client against `dockyard serve --http`
and checks both the refusal and that the asset is unchanged.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from contextlib import closing
from typing import Any

import anyio
import httpx2
import pytest

from tests.conftest import call, call_error
from tests.served import Served, connect, mint

pytestmark = pytest.mark.anyio

SANDBOX = ["sandbox:create", "sandbox:exec", "sandbox:files"]
DISPATCH = ["dispatch:create", "dispatch:read"]
TEAM = ["team:lead"]


async def dispatched(client: Any, script: str, **extra: Any) -> dict[str, Any]:
    return await call(
        client,
        "dispatch",
        mode=extra.pop("mode", "remote"),
        rationale="test",
        task_summary="a job",
        prompt=script,
        **extra,
    )


async def finished(client: Any, dispatch_id: str) -> dict[str, Any]:
    state = await call(client, "await_dispatch", dispatch_id=dispatch_id, timeout_s=120)
    assert state["status"] in ("completed", "failed"), state
    return state


async def run_token_minted(served: Served, dispatch_id: str) -> None:
    """Wait until the dispatch's run holds its own token (minted just before its runner starts)."""
    with anyio.fail_after(60):
        while True:
            with closing(sqlite3.connect(served.data_dir / "dockyard.db")) as db:
                if db.execute("SELECT 1 FROM token WHERE run_id = ?", (dispatch_id,)).fetchone():
                    return
            await anyio.sleep(0.1)


def http_status(served: Served, token: str) -> int:
    """What a fresh request with `token` gets at /mcp (200: let in, 401: refused)."""
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "probe", "version": "0"},
        },
    }
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {token}",
    }
    return httpx2.post(f"{served.url}/mcp", content=json.dumps(body), headers=headers, timeout=30).status_code


# -- 1. bindings a caller cannot choose ---------------------------------------------------------


async def test_workspace_b_cannot_bind_a_token_to_a_dispatch_of_a_or_submit_its_result(served: Served) -> None:
    a = await mint(served, scopes=[*DISPATCH], workspace_id="a")
    b = await mint(served, scopes=[*DISPATCH, "token:mint"], workspace_id="b")
    async with connect(served, a["token"]) as client_a, connect(served, b["token"]) as client_b:
        sent = await dispatched(client_a, "sleep 4; echo a-result")
        target = sent["dispatch_id"]
        # Minting a token that names A's run: refused, for B and for the admin key alike.
        assert "runs are bound by dockyard" in await call_error(
            client_b, "token_mint", scopes=["dispatch:read"], run_id=target
        )
        async with connect(served, served.admin_key) as admin:
            refused = await call_error(admin, "token_mint", scopes=["dispatch:read"], workspace_id="b", run_id=target)
            assert "runs are bound by dockyard" in refused
        # Submitting a forged result with B's own token as the proof: refused.
        message = await call_error(
            client_b, "dispatch_submit", dispatch_id=target, result="forged by b", proof=b["token"]
        )
        assert "unknown dispatch" in message
        state = await finished(client_a, target)
    assert state["status"] == "completed" and state["result"] == "a-result\n"


async def test_a_token_of_the_same_workspace_is_no_proof_for_a_dispatch_it_was_not_minted_for(served: Served) -> None:
    ann = await mint(served, scopes=[*DISPATCH, "token:mint"], workspace_id="w", user_id="ann")
    async with connect(served, ann["token"]) as client:
        victim = (await dispatched(client, "sleep 4; echo real"))["dispatch_id"]
        # The runner of another dispatch of the same workspace hands its own run's token over
        # as a proof for the victim: it is a real run token, but not this dispatch's.
        leaked = await finished(client, (await dispatched(client, 'echo "$DOCKYARD_TOKEN"; sleep 3'))["dispatch_id"])
        other_run_token = leaked["result"].strip()
        assert other_run_token.startswith("dyt_")
        child = await call(client, "token_mint", scopes=["dispatch:read"])
        for proof in (other_run_token, child["token"], ann["token"]):
            message = await call_error(client, "dispatch_submit", dispatch_id=victim, result="forged", proof=proof)
            assert "not this run's token" in message or "not the token dockyard minted" in message, message
        state = await finished(client, victim)
    assert state["result"] == "real\n"
    async with connect(served, served.admin_key) as admin:
        rows = (await call(admin, "audit_query", details=True, workspace_id="w", kind="dispatch.submit"))["rows"]
    assert len([row for row in rows if row["outcome"] == "denied" and row["target"] == victim]) == 3


async def test_a_lead_cannot_act_as_a_member_of_its_own_team(served: Served) -> None:
    lead = await mint(served, scopes=[*TEAM, "team:member", "token:mint", *SANDBOX], workspace_id="w", user_id="ann")
    async with connect(served, lead["token"]) as client:
        team = (await call(client, "team_create", name="crew"))["team_id"]
        member = await call(client, "team_spawn", team_id=team, role="worker", prompt="true")
        await call(client, "team_add_tasks", team_id=team, tasks=[{"title": "the prize"}])
        # A token naming the member's run cannot be minted...
        assert "runs are bound by dockyard" in await call_error(
            client, "token_mint", scopes=["team:member"], run_id=member["member_id"]
        )
        # ...and the lead's own token, even with team:member, claims as nobody but the lead.
        assert "members claim tasks" in await call_error(client, "team_claim", team_id=team)
        view = await call(client, "team_tasks", team_id=team)
    assert [task["status"] for task in view["tasks"]] == ["open"]


# -- 2. revocation is total and prompt ----------------------------------------------------------


async def test_revoking_a_token_revokes_everything_minted_from_it_at_once(served: Served) -> None:
    parent = await mint(served, scopes=["sandbox:exec", "token:mint"], workspace_id="w")
    async with connect(served, parent["token"]) as client:
        child = await call(client, "token_mint", scopes=["sandbox:exec", "token:mint"])
    async with connect(served, child["token"]) as client:
        grandchild = await call(client, "token_mint", scopes=["sandbox:exec"])
    for token in (parent, child, grandchild):
        assert http_status(served, token["token"]) == 200
    async with connect(served, served.admin_key) as admin:
        await call(admin, "token_revoke", token_id=parent["token_id"])
    started = time.monotonic()
    assert [http_status(served, t["token"]) for t in (parent, child, grandchild)] == [401, 401, 401]
    assert time.monotonic() - started < 1.0


async def test_a_revoked_parent_cannot_mint_and_its_open_session_is_refused_on_the_next_call(served: Served) -> None:
    parent = await mint(served, scopes=["sandbox:exec", "token:mint"], workspace_id="w")
    async with connect(served, parent["token"]) as client:
        child = await call(client, "token_mint", scopes=["sandbox:exec", "token:mint"])
        async with connect(served, child["token"]) as child_client:
            assert (await call(child_client, "whoami"))["token_id"] == child["token_id"]
            async with connect(served, served.admin_key) as admin:
                await call(admin, "token_revoke", token_id=parent["token_id"])
            # The session opened before the revocation: its next call is refused.
            with anyio.fail_after(1):
                with pytest.raises(Exception):  # noqa: B017 - a refusal, whichever error the client raises for it
                    await call(child_client, "token_mint", scopes=["sandbox:exec"])


async def test_a_run_token_dies_with_its_run_and_with_the_token_that_started_it(served: Served) -> None:
    ann = await mint(served, scopes=[*DISPATCH, "token:mint"], workspace_id="w")
    async with connect(served, ann["token"]) as client:
        done = await finished(client, (await dispatched(client, 'echo "$DOCKYARD_TOKEN"'))["dispatch_id"])
        assert http_status(served, done["result"].strip()) == 401  # the run ended: its token is dead
        starter = await call(client, "token_mint", scopes=[*DISPATCH])
    async with connect(served, starter["token"]) as client:
        running = await dispatched(client, 'echo "$DOCKYARD_TOKEN" > /workspace/t; sleep 6; echo done')
        await run_token_minted(served, running["dispatch_id"])
    async with connect(served, ann["token"]) as client:
        await call(client, "token_revoke", token_id=starter["token_id"])
    async with connect(served, served.admin_key) as admin:
        rows = (await call(admin, "audit_query", details=True, workspace_id="w", kind="token.revoke"))["rows"]
    revoked_with = rows[0]["detail"]["also_revoked"]
    assert len(revoked_with) == 1 and revoked_with[0].startswith("tok_"), rows[0]  # the run's token went too
    async with connect(served, ann["token"]) as client:
        await finished(client, running["dispatch_id"])


LINGER = """
import json, os, time, anyio
from mcp import Client, StdioServerParameters
async def main():
    params = StdioServerParameters(command="dockyard-bridge", env={"DOCKYARD_TOKEN": os.environ["DOCKYARD_TOKEN"]})
    async with Client(params) as client:
        async def who():
            try:
                result = await client.call_tool("whoami", {})
            except Exception as exc:
                return {"error": str(exc)}
            return {"error": result.content[0].text} if result.is_error else result.structured_content
        json.dump(await who(), open("/workspace/first.json", "w"))
        for _ in range(300):
            if os.path.exists("/workspace/go"):
                break
            time.sleep(0.1)
        json.dump(await who(), open("/workspace/second.json", "w"))
anyio.run(main)
"""


async def test_a_bridge_session_of_a_run_is_refused_once_the_run_ended(served: Served) -> None:
    """A runner leaves a process behind holding a bridge session with its run's token; once the
    run ends, that session's calls are refused (it does not keep the run's identity)."""
    ann = await mint(served, scopes=[*DISPATCH, *SANDBOX], workspace_id="w")
    # The program goes in base64: its source would otherwise trip the dispatch hints ("async").
    program = base64.b64encode(LINGER.encode()).decode()
    lingering = f"""
echo {program} | base64 -d > /workspace/linger.py
setsid nohup /opt/dockyard/client/bin/python /workspace/linger.py > /workspace/linger.log 2>&1 &
for i in $(seq 100); do test -s /workspace/first.json && break; sleep 0.1; done
cat /workspace/first.json
"""
    async with connect(served, ann["token"]) as client:
        sandbox = (await call(client, "sandbox_create"))["sandbox_id"]
        state = await finished(
            client, (await dispatched(client, lingering, mode="local", sandbox_id=sandbox))["dispatch_id"]
        )
        assert (state["status"], state["mode"]) == ("completed", "local"), state
        first = json.loads(state["result"])
        assert first["run_id"] == state["dispatch_id"]  # the session acted as the run
        await call(client, "sandbox_exec", sandbox_id=sandbox, command="touch /workspace/go")
        script = "for i in $(seq 100); do test -s /workspace/second.json && break; sleep 0.1; done; cat /workspace/second.json"
        second = (await call(client, "sandbox_exec", sandbox_id=sandbox, command=script))["stdout"]
        log = (await call(client, "sandbox_exec", sandbox_id=sandbox, command="cat /workspace/linger.log; ps -ef"))[
            "stdout"
        ]
    assert "revoked" in json.loads(second or "{}").get("error", ""), (second, log)


# -- 3. nothing crosses a workspace -------------------------------------------------------------


async def listen_for(served: Served, token: str, uri: str, seconds: float) -> list[float]:
    """When (monotonic time) a listener presenting `token` heard a change of `uri`, over `seconds`."""
    heard: list[float] = []
    async with connect(served, token) as client, client.listen(resource_subscriptions=[uri]) as changes:
        with anyio.move_on_after(seconds):
            async for _ in changes:
                heard.append(time.monotonic())
    return heard


async def test_workspace_b_hears_nothing_of_a_dispatch_of_a(served: Served) -> None:
    a = await mint(served, scopes=DISPATCH, workspace_id="a", user_id="user")
    b = await mint(served, scopes=DISPATCH, workspace_id="b", user_id="user")  # the same user name
    async with connect(served, a["token"]) as client_a:
        target = (await dispatched(client_a, "sleep 2; echo done"))["dispatch_id"]
        uri = f"dockyard://dispatches/{target}"
        heard: dict[str, list[float]] = {}

        async def listen(name: str, token: str) -> None:
            heard[name] = await listen_for(served, token, uri, 8)

        async with anyio.create_task_group() as tg:
            tg.start_soon(listen, "a", a["token"])
            tg.start_soon(listen, "b", b["token"])
        async with connect(served, b["token"]) as client_b:
            with pytest.raises(Exception, match="unknown dispatch"):
                await client_b.read_resource(uri)
    assert len(heard["a"]) >= 1, heard  # the owner's subscription works
    assert heard["b"] == [], heard


async def test_a_listener_without_dispatch_read_or_with_a_revoked_token_hears_nothing(served: Served) -> None:
    owner = await mint(served, scopes=[*DISPATCH, "token:mint"], workspace_id="a")
    async with connect(served, owner["token"]) as client:
        blind = await call(client, "token_mint", scopes=["dispatch:create"])
        revoked = await call(client, "token_mint", scopes=["dispatch:read"])
        target = (await dispatched(client, "sleep 5; echo done"))["dispatch_id"]
    uri = f"dockyard://dispatches/{target}"
    heard: dict[str, list[float]] = {}
    revoked_at: list[float] = []

    async def listen(name: str, token: str) -> None:
        heard[name] = await listen_for(served, token, uri, 9)

    async def revoke_soon() -> None:
        await anyio.sleep(1.5)
        async with connect(served, owner["token"]) as client:
            await call(client, "token_revoke", token_id=revoked["token_id"])
        revoked_at.append(time.monotonic())

    async with anyio.create_task_group() as tg:
        tg.start_soon(listen, "blind", blind["token"])
        tg.start_soon(listen, "revoked", revoked["token"])
        tg.start_soon(listen, "owner", owner["token"])
        tg.start_soon(revoke_soon)
    # The dispatch completes after the revocation: the owner hears it, the revoked token does not.
    assert [t for t in heard["owner"] if t > revoked_at[0]], (heard, revoked_at)
    assert heard["blind"] == [] and [t for t in heard["revoked"] if t > revoked_at[0]] == [], (heard, revoked_at)


async def test_an_http_session_serves_only_the_token_that_opened_it(served: Served) -> None:
    """B presents A's session id with its own token (the same user name, another workspace):
    the session does not exist for B."""
    a = await mint(served, scopes=SANDBOX, workspace_id="a", user_id="user")
    b = await mint(served, scopes=SANDBOX, workspace_id="b", user_id="user")
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "probe", "version": "0"},
        },
    }
    async with httpx2.AsyncClient(timeout=30) as http:
        opened = await http.post(
            f"{served.url}/mcp", json=init, headers={**headers, "Authorization": f"Bearer {a['token']}"}
        )
        session = opened.headers["mcp-session-id"]
        ask = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
        stolen = await http.post(
            f"{served.url}/mcp",
            json=ask,
            headers={
                **headers,
                "Authorization": f"Bearer {b['token']}",
                "mcp-session-id": session,
                "mcp-protocol-version": "2025-06-18",
            },
        )
    assert stolen.status_code == 404, (stolen.status_code, stolen.text[:300])


# -- 5. users own what they make ----------------------------------------------------------------


async def test_a_user_cannot_end_what_another_user_of_the_workspace_made(served: Served) -> None:
    scopes = [*SANDBOX, *DISPATCH, *TEAM]
    ann = await mint(served, scopes=scopes, workspace_id="w", user_id="ann")
    bob = await mint(served, scopes=scopes, workspace_id="w", user_id="bob")
    boss = await mint(served, scopes=[*scopes, "workspace:admin"], workspace_id="w", user_id="cat")
    async with connect(served, ann["token"]) as client_ann, connect(served, bob["token"]) as client_bob:
        sandbox = (await call(client_ann, "sandbox_create"))["sandbox_id"]
        running = (await dispatched(client_ann, "sleep 30"))["dispatch_id"]
        team = (await call(client_ann, "team_create", name="ann's"))["team_id"]
        await call(client_ann, "team_add_tasks", team_id=team, tasks=[{"title": "t"}])
        attempts = [
            ("sandbox_destroy", {"sandbox_id": sandbox}),
            ("cancel_dispatch", {"dispatch_id": running}),
            ("team_shutdown", {"team_id": team}),
            ("team_cleanup", {"team_id": team}),
        ]
        for tool, arguments in attempts:
            assert "needs the workspace:admin scope" in await call_error(client_bob, tool, **arguments), tool
        # Working in it stays shared: bob may run a command in ann's sandbox and read her team.
        assert (await call(client_bob, "sandbox_exec", sandbox_id=sandbox, command="echo shared"))[
            "stdout"
        ] == "shared\n"
        assert (await call(client_bob, "team_tasks", team_id=team))["team"]["status"] == "active"
        assert (await call(client_ann, "await_dispatch", dispatch_id=running, timeout_s=0))["status"] in (
            "queued",
            "running",
        )
        assert sandbox in {s["sandbox_id"] for s in (await call(client_ann, "sandbox_list"))["sandboxes"]}
    async with connect(served, boss["token"]) as client_boss:
        await call(client_boss, "cancel_dispatch", dispatch_id=running)
        await call(client_boss, "sandbox_destroy", sandbox_id=sandbox)
        await call(client_boss, "team_cleanup", team_id=team)
    async with connect(served, served.admin_key) as admin:
        rows = (await call(admin, "audit_query", details=True, workspace_id="w", actor="bob"))["rows"]
    denied = {row["kind"] for row in rows if row["outcome"] == "denied"}
    assert {"sandbox.destroy", "dispatch.cancel", "team.shutdown", "team.cleanup"} <= denied, denied


async def test_a_user_cannot_revoke_another_users_token_but_an_admin_of_the_workspace_can(served: Served) -> None:
    ann = await mint(served, scopes=["sandbox:exec", "token:mint"], workspace_id="w", user_id="ann")
    bob = await mint(served, scopes=["sandbox:exec", "token:mint"], workspace_id="w", user_id="bob")
    boss = await mint(served, scopes=["token:mint", "workspace:admin"], workspace_id="w", user_id="cat")
    async with connect(served, bob["token"]) as client:
        assert "needs the workspace:admin scope" in await call_error(client, "token_revoke", token_id=ann["token_id"])
        own_child = await call(client, "token_mint", scopes=["sandbox:exec"])
        await call(client, "token_revoke", token_id=own_child["token_id"])  # its own: fine
    assert http_status(served, ann["token"]) == 200
    async with connect(served, boss["token"]) as client:
        await call(client, "token_revoke", token_id=ann["token_id"])
    assert http_status(served, ann["token"]) == 401


async def test_messages_of_two_users_leading_one_team_carry_their_real_authors(served: Served) -> None:
    scopes = [*SANDBOX, *TEAM]
    ann = await mint(served, scopes=scopes, workspace_id="w", user_id="ann")
    bob = await mint(served, scopes=scopes, workspace_id="w", user_id="bob")
    async with connect(served, ann["token"]) as client_ann, connect(served, bob["token"]) as client_bob:
        team = (await call(client_ann, "team_create", name="shared"))["team_id"]
        # The member echoes each message it gets (JSON lines on stdin) back to the lead.
        echo = "cat > /dev/null"
        await call(client_ann, "team_spawn", team_id=team, role="worker", prompt=echo)
        await call(client_ann, "team_message", team_id=team, to="worker", body="from ann")
        await call(client_bob, "team_message", team_id=team, to="worker", body="from bob")
        sent = (await call(client_bob, "team_read", team_id=team))["sent"]
        inbox = "/workspace/.dockyard/inbox/worker.jsonl"
        mirrored = ""
        with anyio.fail_after(60):
            while "from bob" not in mirrored:
                await anyio.sleep(0.3)
                view = await call(client_ann, "team_tasks", team_id=team)
                sandbox = next(m["sandbox_id"] for m in view["members"] if m["role"] == "worker")
                if sandbox is not None:
                    read = await client_ann.call_tool("sandbox_read_file", {"sandbox_id": sandbox, "path": inbox})
                    mirrored = "" if read.is_error else read.structured_content["content"]
    authors = {(m["body"], m["author"]) for m in sent}
    assert ("from ann", "ann") in authors and ("from bob", "bob") in authors, sent
    wire = {json.loads(line)["body"]: json.loads(line)["author"] for line in mirrored.splitlines()}
    assert wire == {"from ann": "ann", "from bob": "bob"}, wire


async def test_a_user_cannot_destroy_another_users_computer(computer_image: str, served: Served) -> None:
    ann = await mint(served, scopes=["computer:use"], workspace_id="w", user_id="ann")
    bob = await mint(served, scopes=["computer:use"], workspace_id="w", user_id="bob")
    async with connect(served, ann["token"]) as client_ann, connect(served, bob["token"]) as client_bob:
        computer = (await call(client_ann, "computer_create"))["computer_id"]
        assert "needs the workspace:admin scope" in await call_error(
            client_bob, "computer_destroy", computer_id=computer
        )
        assert computer in {c["computer_id"] for c in (await call(client_ann, "computer_list"))["computers"]}
        await call(client_ann, "computer_destroy", computer_id=computer)


async def test_a_snapshot_is_deleted_only_by_its_maker_or_an_admin_of_its_workspace(served: Served) -> None:
    ann = await mint(served, scopes=SANDBOX, workspace_id="w", user_id="ann")
    bob = await mint(served, scopes=SANDBOX, workspace_id="w", user_id="bob")
    eve = await mint(served, scopes=SANDBOX, workspace_id="other", user_id="eve")
    boss = await mint(served, scopes=[*SANDBOX, "workspace:admin"], workspace_id="w", user_id="cat")
    async with connect(served, ann["token"]) as client_ann:
        sandbox = (await call(client_ann, "sandbox_create"))["sandbox_id"]
        await call(client_ann, "sandbox_exec", sandbox_id=sandbox, command="echo mine > /workspace/note")
        snapshot = (await call(client_ann, "sandbox_snapshot", sandbox_id=sandbox))["snapshot_id"]
    async with connect(served, eve["token"]) as client_eve:
        assert "unknown snapshot" in await call_error(client_eve, "snapshot_delete", snapshot_id=snapshot)
    async with connect(served, bob["token"]) as client_bob:
        assert "needs the workspace:admin scope" in await call_error(
            client_bob, "snapshot_delete", snapshot_id=snapshot
        )
        # Still whole: bob may restore it (the workspace's work is shared), only not delete it.
        restored = (await call(client_bob, "sandbox_create", from_snapshot=snapshot))["sandbox_id"]
        assert (await call(client_bob, "sandbox_exec", sandbox_id=restored, command="cat /workspace/note"))[
            "stdout"
        ] == "mine\n"
    async with connect(served, boss["token"]) as client_boss:
        assert (await call(client_boss, "snapshot_delete", snapshot_id=snapshot))["deleted"] is True
        assert "unknown snapshot" in await call_error(client_boss, "sandbox_create", from_snapshot=snapshot)
    async with connect(served, served.admin_key) as admin:
        rows = (await call(admin, "audit_query", details=True, workspace_id="w", kind="snapshot.delete"))["rows"]
    assert sorted((row["user_id"], row["outcome"]) for row in rows) == [("bob", "denied"), ("cat", "ok")], rows
