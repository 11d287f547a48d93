"""A template may run its sandboxes under another OCI runtime registered with Docker (gVisor's
runsc); one that asks for a runtime Docker lacks is refused, naming those it has, and holds nothing."""

from __future__ import annotations

from pathlib import Path

import docker
import pytest

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.errors import InvalidRequestError
from dockyard.runtime.substrate.settings import Settings
from tests.conftest import make_settings, remove_instance

pytestmark = pytest.mark.anyio


def on_runtime(tmp_path: Path, runtime: str) -> Settings:
    return make_settings(tmp_path / "data", templates={"default": {"runtime": runtime, "pool": {"min": 0, "max": 2}}})


async def test_a_template_asking_for_a_runtime_docker_lacks_is_refused_naming_those_it_has(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    settings = on_runtime(tmp_path, "no-such-runtime")
    try:
        async with Engine.open(settings) as engine:
            with pytest.raises(InvalidRequestError) as refused:
                await engine.sandboxes.create(engine.operator)
            message = str(refused.value)
            assert "OCI runtime 'no-such-runtime'" in message and "it has: " in message and "runc" in message, message
            assert await engine.sandboxes.list(engine.operator) == []
        assert docker_client.containers.list(all=True, filters={"label": f"dockyard.instance={engine.instance}"}) == []
    finally:
        remove_instance(docker_client, settings)


async def test_a_runsc_template_runs_under_gvisor_where_docker_has_runsc(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    """Where runsc is registered, the sandbox's kernel is gVisor's; elsewhere the template is refused."""
    registered = sorted(docker_client.info().get("Runtimes") or {})
    settings = on_runtime(tmp_path, "runsc")
    try:
        async with Engine.open(settings) as engine:
            if "runsc" not in registered:
                with pytest.raises(InvalidRequestError, match="OCI runtime 'runsc'"):
                    await engine.sandboxes.create(engine.operator)
                return
            box = await engine.sandboxes.create(engine.operator)
            ran = await engine.sandboxes.exec(
                engine.operator, box.sandbox_id, "uname -r; id -un; echo kept > /workspace/f; cat /workspace/f"
            )
            assert ran.stdout.splitlines() == ["4.4.0", "agent", "kept"], ran  # gVisor reports kernel 4.4.0
    finally:
        remove_instance(docker_client, settings)
