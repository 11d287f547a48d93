"""Start-up reconciliation: adopt what the store knows, remove what it does not, never leak."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from dockyard.runtime.engine import Engine, instance_id
from dockyard.runtime.settings import Settings
from dockyard.runtime.store import Runtime
from tests.conftest import make_settings, remove_instance

pytestmark = pytest.mark.anyio


def containers_of(client: docker.DockerClient, settings: Settings) -> list[str]:
    label = f"dockyard.instance={instance_id(settings)}"
    return sorted(c.labels.get("dockyard.runtime", "") for c in client.containers.list(all=True, filters={"label": label}))


async def test_restart_adopts_live_sandboxes_and_removes_unknown_containers(
    settings: Settings, cleanup: None, docker_client: docker.DockerClient
) -> None:
    async with Engine.open(settings) as engine:
        kept = await engine.sandboxes.create(engine.operator)
        await engine.sandboxes.write_file(engine.operator, kept.sandbox_id, "state.txt", "still here", "utf-8")
        gone = await engine.sandboxes.create(engine.operator)
        gone_row = await engine.store.get(Runtime, gone.sandbox_id)
    # While the server is down: one container disappears, and a stray labelled one appears
    # (as if the server crashed between starting a container and recording it).
    docker_client.containers.get(gone_row.container_id).remove(force=True, v=True)
    stray = docker_client.containers.run(
        "dockyard/sandbox:latest",
        detach=True,
        labels={"dockyard.managed": "true", "dockyard.instance": instance_id(settings), "dockyard.runtime": "sbx_stray"},
        network_mode="none",
    )

    async with Engine.open(settings) as engine:  # reconciles on the way in
        assert containers_of(docker_client, settings) == [kept.sandbox_id]
        assert [s.sandbox_id for s in await engine.sandboxes.list(engine.operator)] == [kept.sandbox_id]
        result = await engine.sandboxes.exec(engine.operator, kept.sandbox_id, "cat state.txt")
        assert result.stdout == "still here"
        assert (await engine.store.get(Runtime, gone.sandbox_id)).status == "lost"
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(stray.id)


async def test_two_instances_on_one_daemon_leave_each_other_alone(
    settings: Settings, cleanup: None, tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    other_settings = make_settings(tmp_path / "other")
    try:
        async with Engine.open(other_settings) as other:
            theirs = await other.sandboxes.create(other.operator)
        async with Engine.open(settings) as engine:
            mine = await engine.sandboxes.create(engine.operator)
            assert [s.sandbox_id for s in await engine.sandboxes.list(engine.operator)] == [mine.sandbox_id]
        assert containers_of(docker_client, other_settings) == [theirs.sandbox_id]
    finally:
        remove_instance(docker_client, other_settings)
