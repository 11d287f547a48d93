"""Quotas on concurrent sandboxes, enforced atomically even when creates race."""

from __future__ import annotations

from pathlib import Path

import anyio
import docker
import pytest
from sqlmodel import select

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.errors import QuotaExceededError
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import Runtime, RuntimeState
from tests.conftest import make_settings, remove_instance

pytestmark = pytest.mark.anyio


@pytest.fixture
async def limited(tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient):
    settings = make_settings(
        tmp_path / "data",
        quotas={"workspace_sandboxes": 4, "user_sandboxes": 2, "run_sandboxes": 1},
        default_pool={"min": 2, "max": 8},
    )
    try:
        async with Engine.open(settings) as engine:
            yield engine
    finally:
        remove_instance(docker_client, settings)


def person(user: str, run: str | None = None) -> Identity:
    return Identity(workspace_id="w", project_id="p", user_id=user, run_id=run)


async def test_racing_creates_never_overshoot_a_quota_and_leave_nothing_claimed(limited: Engine) -> None:
    made: list[str] = []
    refusals: list[str] = []

    async def create(user: str) -> None:
        try:
            made.append((await limited.sandboxes.create(person(user))).sandbox_id)
        except QuotaExceededError as exc:
            refusals.append(str(exc))

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(create, f"u{i % 4}")
    assert len(made) == 4 and len(refusals) == 4
    assert all("workspace_sandboxes reached: 4 of 4" in message for message in refusals), refusals
    claimed = await limited.store.run(
        lambda s: s.exec(select(Runtime).where(Runtime.state == RuntimeState.CLAIMED)).all()
    )
    assert sorted(r.sandbox_id for r in claimed) == sorted(made)  # no runtime claimed for a refusal


async def test_user_and_run_quotas_name_themselves(limited: Engine) -> None:
    await limited.sandboxes.create(person("ann"))
    await limited.sandboxes.create(person("ann"))
    with pytest.raises(QuotaExceededError, match="user_sandboxes reached: 2 of 2"):
        await limited.sandboxes.create(person("ann"))
    await limited.sandboxes.create(person("bob", run="r1"))
    with pytest.raises(QuotaExceededError, match="run_sandboxes reached: 1 of 1"):
        await limited.sandboxes.create(person("cat", run="r1"))
    await limited.sandboxes.create(person("dan"))
    with pytest.raises(QuotaExceededError, match="workspace_sandboxes reached: 4 of 4"):
        await limited.sandboxes.create(person("eve"))
