"""The MCP Tasks extension through the official client: dispatch and long calls as tasks for a
client that declares it, the ordinary answers for one that does not, cancel, and restarts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import docker
import pytest
from mcp import Client, MCPError
from mcp.types import CallToolResult
from sqlmodel import Session, create_engine, select

from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import CallTask
from dockyard.server.app import build_server
from tests.conftest import call, make_settings, remove_instance, sh
from tests.tasks_client import TaskHandle, TasksClient, cancel, get, handle, until_done, update

pytestmark = pytest.mark.anyio

DISPATCH = {"mode": "remote", "rationale": "a test", "task_summary": "run a script"}


@pytest.fixture
async def tasks(settings: Settings, cleanup: None) -> AsyncIterator[Client]:
    """A client that declares the Tasks extension on its requests."""
    async with Client(build_server(settings), extensions=[TasksClient()]) as connected:
        yield connected


def task_rows(settings: Settings) -> list[CallTask]:
    with Session(create_engine(f"sqlite:///{settings.store_path}")) as session:
        return list(session.exec(select(CallTask)).all())


async def test_a_declaring_client_gets_a_dispatch_as_a_task_and_polls_it_to_the_dispatchs_result(
    tasks: Client, settings: Settings
) -> None:
    made = await handle(tasks, "dispatch", prompt="sleep 1; echo from-the-task", **DISPATCH)
    assert isinstance(made, TaskHandle), made
    assert made.status == "working" and made.task_id.startswith("tsk_") and len(made.task_id) > 40
    assert made.poll_interval_ms and made.ttl_ms
    # The task is on the record before its handle came back, with its dispatch.
    (row,) = task_rows(settings)
    assert row.id == made.task_id and row.dispatch_id and row.dispatch_id.startswith("dsp_")
    done = await until_done(tasks.session, made.task_id)
    assert done.status == "completed" and done.result is not None
    finished = CallToolResult.model_validate(done.result)
    assert not finished.is_error and finished.structured_content is not None
    assert finished.structured_content["status"] == "completed"
    assert finished.structured_content["result"] == "from-the-task\n"
    assert finished.structured_content["dispatch_id"] == row.dispatch_id
    # The same dispatch, read the ordinary way, says the same.
    awaited = await call(tasks, "await_dispatch", dispatch_id=row.dispatch_id)
    assert set(awaited) == set(finished.structured_content)  # the shape dispatch's results have
    assert {k: awaited[k] for k in ("status", "result", "mode")} == {
        k: finished.structured_content[k] for k in ("status", "result", "mode")
    }
    # A client that lets the SDK drive the task gets the tool's result in one call.
    driven = await tasks.call_tool("dispatch", {"prompt": "echo driven", **DISPATCH})
    assert driven.structured_content is not None
    assert (driven.structured_content["status"], driven.structured_content["result"]) == ("completed", "driven\n")


async def test_a_client_that_does_not_declare_tasks_gets_the_ordinary_dispatch_result(
    client: Client, settings: Settings
) -> None:
    sent = await call(client, "dispatch", prompt="echo plain", **DISPATCH)
    assert sent["status"] in ("queued", "running") and "await_dispatch" in sent["next_steps"]
    done = await call(client, "await_dispatch", dispatch_id=sent["dispatch_id"], timeout_s=120)
    assert (done["status"], done["result"]) == ("completed", "plain\n")
    assert task_rows(settings) == []
    # Nor may it drive tasks: tasks/get asks for the extension first.
    with pytest.raises(MCPError) as refused:
        await get(client.session, "tsk_anything")
    assert refused.value.error.code == -32021


async def test_cancelling_a_dispatch_task_cancels_the_dispatch(tasks: Client, settings: Settings) -> None:
    made = await handle(tasks, "dispatch", prompt="sleep 300", **DISPATCH)
    assert isinstance(made, TaskHandle)
    await cancel(tasks.session, made.task_id)
    ended = await until_done(tasks.session, made.task_id, timeout_s=60)
    assert ended.status == "cancelled" and ended.result is None
    (row,) = task_rows(settings)
    assert (await call(tasks, "await_dispatch", dispatch_id=row.dispatch_id))["status"] == "cancelled"
    assert (await call(tasks, "sandbox_list"))["sandboxes"] == []  # its remote sandbox went back to the pool


async def test_a_refused_dispatch_is_answered_at_once_with_no_task(tasks: Client, settings: Settings) -> None:
    refused = await handle(tasks, "dispatch", mode="local", rationale="r", task_summary="t", prompt="true")
    assert isinstance(refused, CallToolResult) and refused.is_error
    assert "sandbox_id" in refused.content[0].text  # type: ignore[union-attr]
    assert task_rows(settings) == []


async def test_a_long_exec_is_a_task_and_a_short_one_is_answered_directly(tasks: Client) -> None:
    sandbox = (await call(tasks, "sandbox_create"))["sandbox_id"]
    quick = await handle(tasks, "sandbox_exec", sandbox_id=sandbox, command="echo quick")
    assert isinstance(quick, CallToolResult) and quick.structured_content is not None
    assert quick.structured_content["stdout"] == "quick\n"
    made = await handle(tasks, "sandbox_exec", sandbox_id=sandbox, command="sleep 3; echo done >> log; echo late")
    assert isinstance(made, TaskHandle) and made.status == "working"
    # The command goes on after the handle came back.
    assert (await get(tasks.session, made.task_id)).status == "working"
    done = await until_done(tasks.session, made.task_id)
    assert done.status == "completed" and done.result is not None
    result = CallToolResult.model_validate(done.result)
    assert result.structured_content is not None
    assert (result.structured_content["exit_code"], result.structured_content["stdout"]) == (0, "late\n")
    assert (await sh(tasks, sandbox, "cat log"))["stdout"] == "done\n"
    # tasks/update has nothing to answer; it is acknowledged and changes nothing.
    await update(tasks.session, made.task_id, {"nothing": {"action": "accept"}})
    assert (await get(tasks.session, made.task_id)).status == "completed"


async def test_cancelling_an_exec_task_kills_its_command(tasks: Client) -> None:
    sandbox = (await call(tasks, "sandbox_create"))["sandbox_id"]
    made = await handle(tasks, "sandbox_exec", sandbox_id=sandbox, command="sleep 300 & echo $! > pid; wait")
    assert isinstance(made, TaskHandle)
    await cancel(tasks.session, made.task_id)
    ended = await get(tasks.session, made.task_id)
    assert ended.status == "cancelled" and ended.result is None
    with anyio.fail_after(30):
        while (await sh(tasks, sandbox, "kill -0 $(cat pid) 2>/dev/null && echo alive || echo gone"))[
            "stdout"
        ] != "gone\n":
            await anyio.sleep(0.2)


async def test_a_forged_task_id_is_not_found(tasks: Client) -> None:
    for forged in ("tsk_forged", "", "x" * 150):
        with pytest.raises(MCPError) as missing:
            await get(tasks.session, forged)
        assert missing.value.error.code == -32602 and "not found" in missing.value.error.message
        with pytest.raises(MCPError):
            await cancel(tasks.session, forged)


async def test_after_a_restart_a_dispatch_task_says_interrupted_and_an_exec_task_failed(
    settings: Settings, cleanup: None
) -> None:
    async with Client(build_server(settings), extensions=[TasksClient()]) as first:
        dispatched = await handle(first, "dispatch", prompt="echo started; sleep 300", **DISPATCH)
        sandbox = (await call(first, "sandbox_create"))["sandbox_id"]
        ran = await handle(first, "sandbox_exec", sandbox_id=sandbox, command="sleep 300")
        assert isinstance(dispatched, TaskHandle) and isinstance(ran, TaskHandle)
        with anyio.fail_after(60):  # the dispatch is running (not merely queued) when dockyard stops
            while (await get(first.session, dispatched.task_id)).status_message != (
                f"dispatch {task_rows(settings)[0].dispatch_id} is running"
            ):
                await anyio.sleep(0.1)
    async with Client(build_server(settings), extensions=[TasksClient()]) as second:
        after = await get(second.session, dispatched.task_id)
        assert after.status == "completed" and after.result is not None
        assert after.result["structuredContent"]["status"] == "interrupted"
        assert "restarted" in (after.status_message or "")
        cut = await get(second.session, ran.task_id)
        assert cut.status == "failed" and cut.error is not None and "restarted" in cut.error["message"]


async def test_a_create_waiting_for_the_pool_is_a_task_that_ends_with_the_sandbox(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    settings = make_settings(tmp_path / "data", default_pool={"min": 0, "max": 1})
    try:
        async with Client(build_server(settings), extensions=[TasksClient()]) as tasks:
            first = (await call(tasks, "sandbox_create"))["sandbox_id"]
            waiting = await handle(tasks, "sandbox_create")
            assert isinstance(waiting, TaskHandle), "the second create should wait for the only runtime"
            assert (await get(tasks.session, waiting.task_id)).status == "working"
            await call(tasks, "sandbox_destroy", sandbox_id=first)
            done = await until_done(tasks.session, waiting.task_id)
            assert done.status == "completed" and done.result is not None
            second = done.result["structuredContent"]["sandbox_id"]
            assert second != first
            assert (await sh(tasks, second, "echo works"))["stdout"] == "works\n"
            # A waiting create that is cancelled never gets a sandbox, even once the runtime is free.
            given_up = await handle(tasks, "sandbox_create")
            assert isinstance(given_up, TaskHandle)
            await cancel(tasks.session, given_up.task_id)
            assert (await get(tasks.session, given_up.task_id)).status == "cancelled"
            await call(tasks, "sandbox_destroy", sandbox_id=second)
            await anyio.sleep(2)
            assert (await call(tasks, "sandbox_list"))["sandboxes"] == []
    finally:
        remove_instance(docker_client, settings)
