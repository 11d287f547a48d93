"""The pool through the MCP surface: a burst of sandbox_create calls on a small pool, the
queue's order, pool_status, and the error a claim gets when a full pool frees nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from mcp import Client
from sqlmodel import Session, create_engine, select

from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import Sandbox
from dockyard.server.app import build_server
from tests.conftest import call, call_error, make_settings, remove_instance

pytestmark = pytest.mark.anyio


@pytest.fixture
def serve(tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient):
    """An in-memory client on a server with the given pool settings; cleaned up afterwards."""
    made: list[Settings] = []

    @asynccontextmanager
    async def open_(**overrides: Any) -> AsyncIterator[tuple[Client, Settings]]:
        settings = make_settings(tmp_path / f"data{len(made)}", **overrides)
        made.append(settings)
        async with Client(build_server(settings)) as client:
            yield client, settings

    yield open_
    for settings in made:
        remove_instance(docker_client, settings)


async def pool(client: Client) -> dict[str, Any]:
    return (await call(client, "pool_status"))["pools"][0]


async def until(client: Client, check: Callable[[dict[str, Any]], bool], within_s: float = 60) -> dict[str, Any]:
    with anyio.fail_after(within_s):
        while not check(info := await pool(client)):
            await anyio.sleep(0.05)
    return info


def running_sandboxes(settings: Settings) -> list[Sandbox]:
    with Session(create_engine(f"sqlite:///{settings.store_path}")) as session:
        return list(session.exec(select(Sandbox).where(Sandbox.status == "running")).all())


async def test_twenty_creates_on_a_pool_of_max_four_are_all_served_once_and_in_order(serve) -> None:
    """One workspace may fill this pool (workspace_pool_share 1): the queue alone decides the order."""
    quotas = {"workspace_pool_share": 1.0}
    async with serve(default_pool={"min": 2, "max": 4}, pool={"claim_timeout_s": 120}, quotas=quotas) as (
        client,
        settings,
    ):
        await until(client, lambda p: p["warm"] == 2 and p["provisioning"] == 0)
        served: list[tuple[int, str]] = []

        async def create(n: int) -> None:
            served.append((n, (await call(client, "sandbox_create"))["sandbox_id"]))

        async with anyio.create_task_group() as tg:
            for n in range(20):
                tg.start_soon(create, n)
                await anyio.sleep(0.03)  # a known arrival order
            with anyio.fail_after(60):
                while len(served) < 4:
                    await anyio.sleep(0.02)
            await until(client, lambda p: p["queue_depth"] == 16)
            first_four = {n for n, _ in served}
            held = [sid for _, sid in served]
            for step in range(16):
                count = len(served)
                await call(client, "sandbox_destroy", sandbox_id=held.pop(0))
                with anyio.fail_after(60):
                    while len(served) == count:
                        await anyio.sleep(0.02)
                held.append(served[-1][1])
                info = await pool(client)
                assert (
                    info["warm"] + info["claimed"] + info["provisioning"] + info["draining"] + info["destroying"] <= 4
                ), info
                assert info["queue_depth"] == 15 - step, info
                runtimes = [s.runtime_id for s in running_sandboxes(settings)]
                assert len(runtimes) == len(set(runtimes)) == 4, runtimes  # no runtime held twice
        assert len({sid for _, sid in served}) == 20
        queued = [n for n, _ in served if n not in first_four]
        assert queued == sorted(queued), queued  # the waiting ones were served first come, first served
        assert first_four == {0, 1, 2, 3}
        final = await pool(client)
        assert final["claims_warm"] + final["claims_cold"] == 20 and final["claimed"] == 4


async def test_pool_status_shows_the_pool_refilling_behind_a_claim(serve) -> None:
    async with serve(default_pool={"min": 2, "max": 5}) as (client, _):
        ready = await until(client, lambda p: p["warm"] == 2 and p["provisioning"] == 0)
        assert (ready["template"], ready["min"], ready["max"], ready["target"]) == ("default", 2, 5, 2)
        await call(client, "sandbox_create")
        after = await pool(client)
        assert after["claimed"] == 1 and after["warm"] + after["provisioning"] == 2  # a refill is on its way
        refilled = await until(client, lambda p: p["warm"] == 2 and p["provisioning"] == 0)
        assert (refilled["claims_warm"], refilled["claims_cold"]) == (1, 0)
        assert refilled["claim_ms_p50"] is not None and refilled["claim_ms_p50"] < 1000


async def test_create_on_a_full_pool_says_so_after_its_timeout_and_takes_nothing(serve) -> None:
    async with serve(default_pool={"min": 0, "max": 1}, pool={"claim_timeout_s": 1}) as (client, settings):
        await call(client, "sandbox_create")
        message = await call_error(client, "sandbox_create")
        assert "pool 'default' is at its max of 1" in message and "destroy a sandbox" in message
        info = await pool(client)
        assert (info["claimed"], info["queue_depth"], info["provisioning"]) == (1, 0, 0)
        assert len(running_sandboxes(settings)) == 1
