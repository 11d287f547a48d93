"""A run's limits count its whole tree: the dispatches it started, theirs, and so on. Each run
acts here as the server makes it act: with the token dockyard minted for its runner, read from
inside its own sandbox."""

from __future__ import annotations

from pathlib import Path

import anyio
import docker
import pytest

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.errors import QuotaExceededError
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import Dispatch, DispatchStatus
from tests.conftest import make_settings, remove_instance

pytestmark = pytest.mark.anyio

USER = Identity(workspace_id="w", project_id="p", user_id="ann", scopes=["*"])
# A runner that hands its run's token to the test and keeps its sandbox meanwhile.
HOLD = 'printf %s "$DOCKYARD_TOKEN" > /workspace/token; sleep 60'


@pytest.fixture
async def engine(tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient):
    settings = make_settings(tmp_path / "data", quotas={"run_sandboxes": 2}, default_pool={"min": 1, "max": 8})
    try:
        async with Engine.open(settings) as engine:
            yield engine
    finally:
        remove_instance(docker_client, settings)


async def start(engine: Engine, who: Identity, prompt: str) -> str:
    return (
        await engine.dispatches.dispatch(who, mode="remote", rationale="fan out", task_summary="a child", prompt=prompt)
    ).dispatch_id


async def runner_of(engine: Engine, dispatch_id: str) -> Identity:
    """What a running dispatch's runner acts as: the identity of the token dockyard gave it."""
    with anyio.fail_after(60):
        while True:
            row = await engine.store.get(Dispatch, dispatch_id)
            assert row is not None and row.status not in DispatchStatus.FINAL, row
            if row.sandbox_id is not None:
                listed = await engine.sandboxes.list_files(USER, row.sandbox_id, ".", False, None)
                if any(entry.path.endswith("token") and entry.size for entry in listed.entries):
                    token = (await engine.sandboxes.read_file(USER, row.sandbox_id, "token", None, None)).content
                    return await engine.tokens.verify(token)
            await anyio.sleep(0.2)


async def test_a_dispatch_chain_three_runs_deep_holds_no_more_sandboxes_than_the_top_runs_limit(engine: Engine) -> None:
    top = await start(engine, USER, HOLD)
    as_top = await runner_of(engine, top)
    assert as_top.run_id == top
    child = await start(engine, as_top, HOLD)
    as_child = await runner_of(engine, child)
    assert as_child.run_id == child  # a run of its own, yet inside the top run's tree

    grandchild = await start(engine, as_child, "echo should not run")
    done = await engine.dispatches.wait(USER, grandchild, 60)
    assert done.status == "failed" and done.sandbox_id is None
    assert f"quota run_sandboxes reached: 2 of 2 sandboxes are running in run '{top}'" in (done.error or ""), done.error
    with pytest.raises(QuotaExceededError, match=f"run_sandboxes reached: 2 of 2 .* run '{top}'"):
        await engine.sandboxes.create(as_child)

    # The limit is on what the tree holds at once: once the child gives its sandbox back, the top run has room again.
    await engine.dispatches.cancel(USER, child)
    again = await start(engine, as_top, "echo room again")
    assert (await engine.dispatches.wait(USER, again, 60)).result == "room again\n"
    await engine.dispatches.cancel(USER, top)


async def test_runs_in_another_tree_keep_their_own_limit(engine: Engine) -> None:
    """Two top-level dispatches of one user are two trees: one at its limit does not hold back the other."""
    first = await start(engine, USER, HOLD)
    as_first = await runner_of(engine, first)
    await engine.sandboxes.create(as_first)
    with pytest.raises(QuotaExceededError, match=f"run '{first}'"):
        await engine.sandboxes.create(as_first)
    second = await start(engine, USER, HOLD)
    as_second = await runner_of(engine, second)
    made = await engine.sandboxes.create(as_second)
    assert made.status == "running"
    for dispatch_id in (first, second):
        await engine.dispatches.cancel(USER, dispatch_id)


async def test_a_child_dispatch_cannot_take_a_second_browser_for_a_run_limited_to_one(
    tmp_path: Path, sandbox_image: str, computer_image: str, docker_client: docker.DockerClient
) -> None:
    settings = make_settings(tmp_path / "browsers", quotas={"run_computers": 1}, computer_pool={"min": 0, "max": 2})
    try:
        async with Engine.open(settings) as engine:
            top = await start(engine, USER, HOLD)
            as_top = await runner_of(engine, top)
            child = await start(engine, as_top, HOLD)
            as_child = await runner_of(engine, child)
            browser = await engine.computers.create(as_top)
            with pytest.raises(
                QuotaExceededError, match=f"quota run_computers reached: 1 of 1 computers are running in run '{top}'"
            ):
                await engine.computers.create(as_child)
            await engine.computers.destroy(USER, browser.computer_id)
            for dispatch_id in (child, top):
                await engine.dispatches.cancel(USER, dispatch_id)
    finally:
        remove_instance(docker_client, settings)
