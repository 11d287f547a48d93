"""Call tasks without Docker, on a real SQLite store: who may reach a task, how a call's end is
recorded, cancel, and what a restart does to the tasks it finds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import anyio
import pytest

from dockyard.runtime.substrate.errors import NotFoundError, StateError
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import CallTask, CallTaskStatus, Store, utcnow
from dockyard.runtime.work.calltasks import INTERRUPTED_ERROR, CallOutcome, CallTaskService

pytestmark = pytest.mark.anyio

ANN = Identity(workspace_id="w", user_id="ann", token_id="tok_ann")
ANNS_OTHER_TOKEN = Identity(workspace_id="w", user_id="ann", token_id="tok_ann2")
EVE = Identity(workspace_id="other", user_id="ann", token_id="tok_ann")  # same ids, another workspace
OPERATOR = Identity()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = Store(tmp_path / "store.db")
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
async def service(store: Store) -> AsyncIterator[CallTaskService]:
    tasks = CallTaskService(store)
    async with anyio.create_task_group() as tg:
        await tg.start(tasks.run)
        yield tasks
        tg.cancel_scope.cancel()


async def test_a_task_is_reached_only_with_the_token_and_workspace_that_made_it(service: CallTaskService) -> None:
    made = await service.create(ANN, "sandbox_exec")
    assert made.id.startswith("tsk_") and len(made.id) >= 40
    assert (await service.get(ANN, made.id)).id == made.id
    for stranger in (ANNS_OTHER_TOKEN, EVE, OPERATOR):
        with pytest.raises(NotFoundError, match="task not found"):
            await service.get(stranger, made.id)
        with pytest.raises(NotFoundError):
            await service.cancel(stranger, made.id)
    local = await service.create(OPERATOR, "dispatch", "dsp_1")
    assert (await service.get(OPERATOR, local.id)).dispatch_id == "dsp_1"
    with pytest.raises(NotFoundError):
        await service.get(ANN, local.id)


async def test_ids_do_not_repeat(service: CallTaskService) -> None:
    ids = {(await service.create(ANN, "sandbox_exec")).id for _ in range(200)}
    assert len(ids) == 200


async def test_an_adopted_call_records_how_it_ended(service: CallTaskService) -> None:
    release = anyio.Event()

    async def work() -> tuple[object, CallOutcome]:
        await release.wait()
        return "value", CallOutcome(CallTaskStatus.COMPLETED, {"content": [], "isError": False})

    call = service.begin(work)
    row = await service.adopt(ANN, "sandbox_exec", call)
    assert (await service.get(ANN, row.id)).status == CallTaskStatus.WORKING
    release.set()
    with anyio.fail_after(5):
        while (done := await service.get(ANN, row.id)).status == CallTaskStatus.WORKING:
            await anyio.sleep(0.01)
    assert (done.status, done.result, done.error) == (CallTaskStatus.COMPLETED, {"content": [], "isError": False}, None)

    async def broken() -> tuple[object, CallOutcome]:
        return None, CallOutcome(CallTaskStatus.FAILED, {"code": -32602, "message": "bad"})

    failing = await service.adopt(ANN, "sandbox_exec", service.begin(broken))
    with anyio.fail_after(5):
        while (ended := await service.get(ANN, failing.id)).status == CallTaskStatus.WORKING:
            await anyio.sleep(0.01)
    assert ended.status == CallTaskStatus.FAILED and ended.error == {"code": -32602, "message": "bad"}
    assert "bad" in (ended.status_message or "")


async def test_cancel_stops_the_call_and_a_finished_task_stays_as_it_ended(service: CallTaskService) -> None:
    stopped = anyio.Event()

    async def forever() -> tuple[object, CallOutcome]:
        try:
            await anyio.sleep_forever()
        finally:
            stopped.set()
        raise AssertionError("unreachable")

    row = await service.adopt(ANN, "sandbox_exec", service.begin(forever))
    cancelled = await service.cancel(ANN, row.id)
    assert cancelled.status == CallTaskStatus.CANCELLED and stopped.is_set()
    assert (await service.cancel(ANN, row.id)).status == CallTaskStatus.CANCELLED  # again: nothing changes
    dispatched = await service.create(ANN, "dispatch", "dsp_1")
    with pytest.raises(StateError, match="through its dispatch"):
        await service.cancel(ANN, dispatched.id)


async def test_a_restart_fails_cut_calls_leaves_dispatch_tasks_and_drops_expired_ones(store: Store) -> None:
    def row(task_id: str, **values: object) -> CallTask:
        now = utcnow()
        fields: dict = dict(
            id=task_id,
            tool="sandbox_exec",
            workspace_id="w",
            project_id="p",
            user_id="ann",
            token_id="tok_ann",
            expires_at=now + timedelta(hours=1),
        )
        return CallTask(**(fields | values))

    await store.add(row("tsk_cut"))
    await store.add(row("tsk_dispatch", tool="dispatch", dispatch_id="dsp_1"))
    await store.add(row("tsk_done", status=CallTaskStatus.COMPLETED.value, result={"content": []}))
    await store.add(row("tsk_old", expires_at=utcnow() - timedelta(seconds=1)))
    service = CallTaskService(store)
    async with anyio.create_task_group() as tg:
        await tg.start(service.run)
        cut = await service.get(ANN, "tsk_cut")
        assert (cut.status, cut.error) == (CallTaskStatus.FAILED, INTERRUPTED_ERROR)
        assert "restart" in (cut.status_message or "")
        assert (await service.get(ANN, "tsk_dispatch")).status == CallTaskStatus.WORKING
        assert (await service.get(ANN, "tsk_done")).result == {"content": []}
        tg.cancel_scope.cancel()
    assert await store.get(CallTask, "tsk_old") is None
