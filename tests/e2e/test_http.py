"""`dockyard serve --http` with the official MCP client: bearer tokens, scopes, workspaces,
attenuation, revocation and expiry, over real HTTP on loopback."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import anyio
import httpx2
import pytest

from tests.conftest import call, call_error
from tests.served import DOCKYARD, Served, connect, mint

pytestmark = pytest.mark.anyio

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}},
}


def status_of(served: Served, token: str | None) -> int:
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx2.post(f"{served.url}/mcp", content=json.dumps(INITIALIZE), headers=headers, timeout=30).status_code


ALL_SANDBOX = ["sandbox:create", "sandbox:exec", "sandbox:files"]


async def test_the_first_start_writes_an_owner_only_admin_key_and_says_where(served: Served) -> None:
    path = served.data_dir / "admin-key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in served.stderr
    assert httpx2.get(f"{served.url}/healthz").json() == {"ok": True}


async def test_no_bad_expired_or_revoked_token_gets_in(served: Served) -> None:
    assert status_of(served, None) == 401
    assert status_of(served, "dyt_not-a-token-of-ours") == 401
    assert status_of(served, "Bearer-less garbage") == 401
    short = await mint(served, scopes=["sandbox:exec"], workspace_id="a", ttl_s=1)
    assert status_of(served, short["token"]) == 200
    await anyio.sleep(1.5)
    assert status_of(served, short["token"]) == 401
    revoked = await mint(served, scopes=["sandbox:exec"], workspace_id="a")
    assert status_of(served, revoked["token"]) == 200
    async with connect(served, served.admin_key) as admin:
        await call(admin, "token_revoke", token_id=revoked["token_id"])
    assert status_of(served, revoked["token"]) == 401
    with pytest.raises(Exception):  # noqa: B017 - the official client cannot even open a session, whatever it raises
        async with connect(served, "dyt_not-a-token-of-ours"):
            pass


async def test_a_token_minted_by_another_server_is_refused(served: Served, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    minted = subprocess.run(
        [DOCKYARD, "token", "mint", "-s", "sandbox:exec", "-w", "a", "--json"],
        env={**os.environ, "DOCKYARD_DATA_DIR": str(elsewhere)},
        capture_output=True,
        text=True,
        check=True,
    )
    foreign = json.loads(minted.stdout)["token"]
    assert foreign.startswith("dyt_")
    assert status_of(served, foreign) == 401


async def test_a_token_does_what_its_scopes_allow_and_nothing_else(served: Served) -> None:
    exec_only = await mint(served, scopes=["sandbox:create", "sandbox:exec"], workspace_id="a", user_id="ann")
    async with connect(served, exec_only["token"]) as client:
        who = await call(client, "whoami")
        assert (who["workspace_id"], who["user_id"], who["scopes"]) == ("a", "ann", ["sandbox:create", "sandbox:exec"])
        sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
        assert (await call(client, "sandbox_exec", sandbox_id=sandbox_id, command="echo ok"))["stdout"] == "ok\n"
        message = await call_error(client, "sandbox_write_file", sandbox_id=sandbox_id, path="x", content="y")
        assert "needs the scope 'sandbox:files'" in message
        assert "needs the scope 'pool:read'" in await call_error(client, "pool_status")
        assert "needs the scope 'token:mint'" in await call_error(client, "token_mint", scopes=["sandbox:exec"])
        await call(client, "sandbox_destroy", sandbox_id=sandbox_id)


async def test_one_workspace_cannot_see_or_touch_another(served: Served) -> None:
    a = await mint(served, scopes=[*ALL_SANDBOX, "token:mint"], workspace_id="a")
    b = await mint(served, scopes=[*ALL_SANDBOX, "token:mint", "pool:read"], workspace_id="b")
    async with connect(served, a["token"]) as client_a, connect(served, b["token"]) as client_b:
        theirs = (await call(client_a, "sandbox_create"))["sandbox_id"]
        await call(client_a, "sandbox_write_file", sandbox_id=theirs, path="secret.txt", content="a's")
        snapshot = (await call(client_a, "sandbox_snapshot", sandbox_id=theirs))["snapshot_id"]
        attempts = [
            ("sandbox_exec", {"sandbox_id": theirs, "command": "cat secret.txt"}),
            ("sandbox_read_file", {"sandbox_id": theirs, "path": "secret.txt"}),
            ("sandbox_write_file", {"sandbox_id": theirs, "path": "x", "content": "b"}),
            ("sandbox_list_files", {"sandbox_id": theirs}),
            ("sandbox_expose_port", {"sandbox_id": theirs, "port": 8000}),
            ("sandbox_snapshot", {"sandbox_id": theirs}),
            ("sandbox_destroy", {"sandbox_id": theirs}),
        ]
        for tool, arguments in attempts:
            assert "unknown sandbox" in await call_error(client_b, tool, **arguments), tool
        assert "unknown snapshot" in await call_error(client_b, "sandbox_create", from_snapshot=snapshot)
        assert (await call(client_b, "sandbox_list"))["sandboxes"] == []
        assert "unknown token" in await call_error(client_b, "token_revoke", token_id=a["token_id"])
        assert "must stay 'b'" in await call_error(client_b, "token_mint", scopes=["sandbox:exec"], workspace_id="a")
        # Still there, untouched, for its owner.
        assert (await call(client_a, "sandbox_read_file", sandbox_id=theirs, path="secret.txt"))["content"] == "a's"
        await call(client_a, "sandbox_destroy", sandbox_id=theirs)
    # Every attempt is on the record, attributed to b's token.
    async with connect(served, served.admin_key) as admin:
        rows = (await call(admin, "audit_query", details=True, workspace_id="b"))["rows"]
    denied = {row["kind"] for row in rows if row["outcome"] == "denied" and row["target"] == theirs}
    assert denied >= {tool.replace("_", ".", 1) for tool, _ in attempts}, denied
    assert {row["token_id"] for row in rows if row["target"] == theirs} == {b["token_id"]}


async def test_a_token_can_only_mint_narrower_tokens(served: Served) -> None:
    parent = await mint(served, scopes=["sandbox:exec", "token:mint"], workspace_id="a", user_id="ann", ttl_s=600)
    async with connect(served, parent["token"]) as client:
        assert "lacks sandbox:create" in await call_error(client, "token_mint", scopes=["sandbox:create"])
        assert "must stay 'ann'" in await call_error(client, "token_mint", scopes=["sandbox:exec"], user_id="bob")
        assert "cannot outlive" in await call_error(client, "token_mint", scopes=["sandbox:exec"], ttl_s=3600)
        assert "runs are bound by dockyard" in await call_error(
            client, "token_mint", scopes=["sandbox:exec"], run_id="run-1"
        )
        child = await call(client, "token_mint", scopes=["sandbox:exec"], ttl_s=60)
    assert child["identity"]["scopes"] == ["sandbox:exec"] and child["identity"]["run_id"] is None
    async with connect(served, child["token"]) as client:
        assert "needs the scope 'token:mint'" in await call_error(client, "token_mint", scopes=["sandbox:exec"])
        assert (await call(client, "whoami"))["user_id"] == "ann"


async def test_the_admin_key_mints_but_does_not_work_in_workspaces(served: Served) -> None:
    async with connect(served, served.admin_key) as admin:
        assert "only mints tokens" in await call_error(admin, "sandbox_create")
        assert "say which workspace" in await call_error(admin, "token_mint", scopes=["sandbox:exec"])


async def test_requests_must_name_this_server_and_stay_under_the_size_cap(served: Served) -> None:
    token = (await mint(served, scopes=["sandbox:exec"], workspace_id="a"))["token"]
    headers = {
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "Authorization": f"Bearer {token}",
    }
    body = json.dumps(INITIALIZE)
    assert httpx2.post(f"{served.url}/mcp", content=body, headers=headers, timeout=30).status_code == 200
    rebound = httpx2.post(
        f"{served.url}/mcp", content=body, headers={**headers, "Host": "attacker.example"}, timeout=30
    )
    assert rebound.status_code in (400, 403, 421), rebound.status_code
    foreign = httpx2.post(
        f"{served.url}/mcp", content=body, headers={**headers, "Origin": "http://attacker.example"}, timeout=30
    )
    assert foreign.status_code == 403, foreign.status_code
    huge = httpx2.post(f"{served.url}/mcp", content=b"x" * (33 << 20), headers=headers, timeout=60)
    assert huge.status_code == 413, huge.status_code


async def test_audit_rows_of_another_workspace_stay_out_of_reach(served: Served) -> None:
    a = await mint(served, scopes=["sandbox:create", "audit:read"], workspace_id="a")
    b = await mint(served, scopes=["audit:read"], workspace_id="b")
    async with connect(served, a["token"]) as client_a, connect(served, b["token"]) as client_b:
        sandbox_id = (await call(client_a, "sandbox_create"))["sandbox_id"]
        await call(client_a, "sandbox_destroy", sandbox_id=sandbox_id)
        kinds = {row["kind"] for row in (await call(client_a, "audit_query", details=True))["rows"]}
        assert {"sandbox.create", "sandbox.destroy"} <= kinds
        assert all(row["workspace_id"] == "b" for row in (await call(client_b, "audit_query", details=True))["rows"])
        assert "only your own workspace" in await call_error(client_b, "audit_query", details=True, workspace_id="a")
        assert (await call(client_b, "audit_verify"))["intact"] is True
