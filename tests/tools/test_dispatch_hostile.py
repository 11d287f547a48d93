"""Hostile callers against dispatch's hold on runtimes: a cancel can land at any moment of a
run, and whatever the run claimed must go back to the pool."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import docker
import pytest
from mcp import Client
from sqlmodel import Session, create_engine, select

from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import Sandbox
from dockyard.server.app import build_server
from tests.conftest import call, make_settings, remove_instance

pytestmark = pytest.mark.anyio

# From at once to well after the runner started: the claim, binding the sandbox to the run,
# the refill that follows it and the runner's start each fall under one of these.
DELAYS_S = [0, 0, 0.001, 0.002, 0.003, 0.005, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08, 0.1, 0.2, 0.5]


@pytest.fixture
def pooled(tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient) -> Iterator[Settings]:
    settings = make_settings(tmp_path / "data", default_pool={"min": 3, "max": 6})
    yield settings
    remove_instance(docker_client, settings)


@pytest.fixture
async def client(pooled: Settings) -> AsyncIterator[Client]:
    async with Client(build_server(pooled)) as connected:
        yield connected


def held_by_runs(settings: Settings, run_ids: list[str]) -> list[tuple[str, str | None]]:
    with Session(create_engine(f"sqlite:///{settings.store_path}")) as session:
        found = session.exec(select(Sandbox).where(Sandbox.status == "running")).all()
        return [(row.id, row.run_id) for row in found if row.run_id in run_ids]


async def test_a_dispatch_cancelled_at_any_moment_gives_back_every_sandbox_it_claimed(
    client: Client, pooled: Settings
) -> None:
    dispatched: list[str] = []
    for round_ in range(2):
        for delay in DELAYS_S:
            sent = await call(
                client, "dispatch", mode="remote", rationale="r", task_summary=f"sleeps {round_}", prompt="sleep 300"
            )
            dispatched.append(sent["dispatch_id"])
            await anyio.sleep(delay)
            cancelled = await call(client, "cancel_dispatch", dispatch_id=sent["dispatch_id"])
            assert cancelled["status"] == "cancelled", cancelled
    # Every cancel has returned: nothing of those runs may be held any more.
    assert held_by_runs(pooled, dispatched) == []
    assert (await call(client, "sandbox_list"))["sandboxes"] == []
    with anyio.fail_after(60):
        while default_pool := [p for p in (await call(client, "pool_status"))["pools"] if p["template"] == "default"]:
            if default_pool[0]["claimed"] == 0:
                break
            await anyio.sleep(0.2)
    assert default_pool[0]["claimed"] == 0
