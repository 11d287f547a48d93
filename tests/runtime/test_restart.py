"""Start-up reconciliation: claimed sandboxes stay with their owners, warm runtimes are reused,
what the store does not know is removed, and what vanished is reported lost."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from dockyard.runtime.engine import Engine, instance_id
from dockyard.runtime.substrate.errors import SandboxLostError
from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import Runtime, RuntimeState, Sandbox
from tests.conftest import make_settings, remove_instance
from tests.runtime.pooltools import live_runtimes, wait_for_pool

pytestmark = pytest.mark.anyio


def containers_of(client: docker.DockerClient, settings: Settings) -> set[str]:
    label = f"dockyard.instance={instance_id(settings)}"
    return {c.id for c in client.containers.list(all=True, sparse=True, filters={"label": label})}


async def test_restart_keeps_claims_reuses_warm_runtimes_and_removes_unknown_containers(
    settings: Settings, cleanup: None, docker_client: docker.DockerClient
) -> None:
    settings.pool.keep_warm_after_exit = True  # as if it had crashed: warm runtimes are left for the restart
    async with Engine.open(settings) as engine:
        kept = await engine.sandboxes.create(engine.operator)
        await engine.sandboxes.write_file(engine.operator, kept.sandbox_id, "state.txt", "still here", "utf-8")
        gone = await engine.sandboxes.create(engine.operator)
        gone_row = await engine.store.get(Sandbox, gone.sandbox_id)
        await wait_for_pool(engine, warm=1)
        warm_before = {r.id for r in await live_runtimes(engine) if r.state == RuntimeState.WARM}
    # While the server is down: one sandbox's container disappears, and a stray labelled one
    # appears (as if the server crashed between starting a container and recording it).
    docker_client.containers.get(gone_row.container_id).remove(force=True, v=True)
    stray = docker_client.containers.run(
        "dockyard/sandbox:latest",
        detach=True,
        labels={"dockyard.managed": "true", "dockyard.instance": instance_id(settings), "dockyard.runtime": "rt_stray"},
        network_mode="none",
    )

    async with Engine.open(settings) as engine:  # reconciles on the way in
        assert [s.sandbox_id for s in await engine.sandboxes.list(engine.operator)] == [kept.sandbox_id]
        result = await engine.sandboxes.exec(engine.operator, kept.sandbox_id, "cat state.txt")
        assert result.stdout == "still here"
        with pytest.raises(SandboxLostError, match="was lost"):
            await engine.sandboxes.exec(engine.operator, gone.sandbox_id, "true")
        live = await live_runtimes(engine)
        assert warm_before <= {r.id for r in live if r.state == RuntimeState.WARM}  # reused, not replaced
        assert containers_of(docker_client, settings) == {r.container_id for r in live}
        assert (await engine.store.get(Runtime, gone_row.runtime_id)).state == RuntimeState.LOST
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(stray.id)


async def test_two_instances_on_one_daemon_leave_each_other_alone(
    settings: Settings, cleanup: None, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    other_settings = make_settings(tmp_path / "other")
    try:
        async with Engine.open(other_settings) as other:
            theirs = await other.sandboxes.create(other.operator)
            theirs_container = (await other.store.get(Sandbox, theirs.sandbox_id)).container_id
        async with Engine.open(settings) as engine:
            mine = await engine.sandboxes.create(engine.operator)
            assert [s.sandbox_id for s in await engine.sandboxes.list(engine.operator)] == [mine.sandbox_id]
        assert theirs_container in containers_of(docker_client, other_settings)
    finally:
        remove_instance(docker_client, other_settings)
