"""Hostile callers against tasks over HTTP with real tokens: a task is its maker's token's alone.

Another token of the same workspace, a token of another workspace, and a forged id all get the
same "task not found": none can read a task's state or result, or cancel it."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from sqlmodel import Session, create_engine, select

from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import CallTask
from dockyard.server.app import build_server
from tests.conftest import call
from tests.served import Served, connect, mint, stop
from tests.tasks_client import TaskHandle, TasksClient, cancel, get, handle, until_done, update

pytestmark = pytest.mark.anyio

WORK = ["dispatch:create", "dispatch:read", "sandbox:create", "sandbox:exec", "audit:read"]


@asynccontextmanager
async def declaring(served: Served, token: str) -> AsyncIterator[Client]:
    """The official client over HTTP with `token`, declaring the Tasks extension."""
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
        async with Client(
            streamable_http_client(f"{served.url}/mcp", http_client=http), extensions=[TasksClient()]
        ) as client:
            yield client


async def refused(client: Client, task_id: str) -> None:
    """Every task request about `task_id` is answered "not found", and changes nothing."""
    for attempt in (get, cancel):
        with pytest.raises(MCPError) as missing:
            await attempt(client.session, task_id)
        assert missing.value.error.code == -32602 and "not found" in missing.value.error.message
    with pytest.raises(MCPError) as missing:
        await update(client.session, task_id, {"x": {"action": "accept"}})
    assert "not found" in missing.value.error.message


def task_row(served: Served, task_id: str) -> CallTask:
    with Session(create_engine(f"sqlite:///{served.data_dir / 'dockyard.db'}")) as session:
        row = session.exec(select(CallTask).where(CallTask.id == task_id)).one()
    return row


async def test_another_token_or_workspace_cannot_read_or_cancel_a_dispatch_task_of_ann(served: Served) -> None:
    ann = await mint(served, scopes=WORK, workspace_id="w", user_id="ann")
    bob = await mint(served, scopes=[*WORK, "workspace:admin"], workspace_id="w", user_id="bob")
    eve = await mint(served, scopes=WORK, workspace_id="other", user_id="eve")
    async with declaring(served, ann["token"]) as owner:
        made = await handle(
            owner, "dispatch", mode="remote", rationale="r", task_summary="t", prompt="sleep 4; echo mine"
        )
        assert isinstance(made, TaskHandle)
        for thief in (bob, eve):
            async with declaring(served, thief["token"]) as attacker:
                await refused(attacker, made.task_id)
        # Nothing changed: the dispatch ran to its end, and only its owner reads the result.
        done = await until_done(owner.session, made.task_id)
        assert done.status == "completed" and done.result is not None
        assert done.result["structuredContent"]["result"] == "mine\n"
    async with declaring(served, eve["token"]) as attacker:
        await refused(attacker, made.task_id)  # a finished task is no more reachable
    async with connect(served, served.admin_key) as admin:
        rows = (await call(admin, "audit_query", workspace_id="other", kind="task.get"))["rows"]
    assert rows and all(row["outcome"] == "denied" and made.task_id not in str(row) for row in rows)


async def test_another_token_cannot_cancel_a_long_exec_task_and_a_forged_id_is_not_found(served: Served) -> None:
    ann = await mint(served, scopes=WORK, workspace_id="w", user_id="ann")
    async with declaring(served, ann["token"]) as owner:
        sandbox = (await call(owner, "sandbox_create"))["sandbox_id"]
        made = await handle(owner, "sandbox_exec", sandbox_id=sandbox, command="sleep 3; echo finished")
        assert isinstance(made, TaskHandle)
        # Another token of the very same user and workspace is still another token.
        second = await mint(served, scopes=WORK, workspace_id="w", user_id="ann")
        async with declaring(served, second["token"]) as other:
            await refused(other, made.task_id)
            for forged in ("tsk_" + "A" * 43, made.task_id[:-1] + ("A" if made.task_id[-1] != "A" else "B")):
                await refused(other, forged)
                await refused(owner, forged)
        assert task_row(served, made.task_id).status == "working"
        done = await until_done(owner.session, made.task_id)
        assert done.status == "completed" and done.result is not None
        assert done.result["structuredContent"]["stdout"] == "finished\n"


async def test_a_client_that_does_not_declare_the_extension_gets_no_task_over_http(served: Served) -> None:
    ann = await mint(served, scopes=WORK, workspace_id="w", user_id="ann")
    async with connect(served, ann["token"]) as plain:
        sent = await call(plain, "dispatch", mode="remote", rationale="r", task_summary="t", prompt="echo plain")
        assert sent["status"] in ("queued", "running") and sent["dispatch_id"].startswith("dsp_")
        with pytest.raises(MCPError) as missing:
            await get(plain.session, "tsk_whatever")
        assert missing.value.error.code == -32021


async def test_a_revoked_token_can_no_longer_read_or_cancel_its_own_task(served: Served) -> None:
    ann = await mint(served, scopes=[*WORK, "token:mint"], workspace_id="w", user_id="ann")
    async with declaring(served, ann["token"]) as parent:
        child = await call(parent, "token_mint", scopes=["dispatch:create", "dispatch:read"])
        async with declaring(served, child["token"]) as holder:
            made = await handle(
                holder, "dispatch", mode="remote", rationale="r", task_summary="t", prompt="sleep 3; echo kept"
            )
            assert isinstance(made, TaskHandle)
            await call(parent, "token_revoke", token_id=child["token_id"])
            for attempt in (get, cancel):  # refused at the door: HTTP takes no revoked token
                with pytest.raises(MCPError):
                    await attempt(holder.session, made.task_id)
        # The revoked holder's cancel was not a cancel (the run ends by the revocation of the
        # token that started it, which revokes the run's token too).
        dispatch_id = task_row(served, made.task_id).dispatch_id
        done = await call(parent, "await_dispatch", dispatch_id=dispatch_id, timeout_s=120)
        assert done["status"] in ("completed", "failed"), done
        rows = (await call(parent, "audit_query", kind="dispatch.cancel"))["rows"]
        assert [row for row in rows if row["outcome"] == "ok"] == []


async def test_after_a_crash_a_dispatch_task_is_still_its_tokens_alone_and_says_interrupted(serve_http: Any) -> None:
    served = serve_http()
    ann = await mint(served, scopes=WORK, workspace_id="w", user_id="ann")
    eve = await mint(served, scopes=WORK, workspace_id="other", user_id="eve")
    async with declaring(served, ann["token"]) as owner:
        made = await handle(owner, "dispatch", mode="remote", rationale="r", task_summary="t", prompt="sleep 300")
        assert isinstance(made, TaskHandle)
        with anyio.fail_after(60):
            while "running" not in ((await get(owner.session, made.task_id)).status_message or ""):
                await anyio.sleep(0.1)
    stop(served, kill=True)
    again = serve_http()  # the same data dir: the store, its tokens and tasks
    assert again.data_dir == served.data_dir
    async with declaring(again, eve["token"]) as attacker:
        await refused(attacker, made.task_id)
    async with declaring(again, ann["token"]) as owner:
        after = await get(owner.session, made.task_id)
        assert after.status == "completed" and after.result is not None
        assert after.result["structuredContent"]["status"] == "interrupted"
        assert "not re-run" in (after.status_message or "")


async def test_a_flood_of_forged_task_ids_finds_nothing_and_leaves_the_audit_chain_whole(
    settings: Settings, cleanup: None
) -> None:
    async with Client(build_server(settings), extensions=[TasksClient()]) as client:
        made = await handle(client, "dispatch", mode="remote", rationale="r", task_summary="t", prompt="echo real")
        assert isinstance(made, TaskHandle)
        misses: list[str] = []

        async def guess(n: int) -> None:
            forged = f"tsk_{secrets.token_urlsafe(32)}" if n % 2 else made.task_id[: 4 + n % 40]
            try:
                await get(client.session, forged)
            except MCPError as exc:
                misses.append(exc.error.message)

        async with anyio.create_task_group() as tg:
            for n in range(200):
                tg.start_soon(guess, n)
        assert len(misses) == 200 and all("not found" in message for message in misses)
        assert (await until_done(client.session, made.task_id)).status == "completed"
        verified = await call(client, "audit_verify")
        assert verified["intact"] is True and verified["rows_checked"] >= 200, verified
