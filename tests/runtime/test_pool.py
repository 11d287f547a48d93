"""The warm pool on real Docker: warm claims, atomic claims under load, fair queueing with a
timeout, recycling that carries nothing over, health eviction and the autoscaler."""

from __future__ import annotations

import io
import tarfile
import time

import anyio
import docker
import pytest
from sqlmodel import col, select

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.errors import PoolExhaustedError, QuotaExceededError
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import Runtime, RuntimeState, Sandbox
from tests.runtime.pooltools import event_reasons, live_runtimes, pool_info, wait_for_pool

pytestmark = pytest.mark.anyio


def who(workspace: str) -> Identity:
    return Identity(workspace_id=workspace, project_id="p", user_id=f"user-{workspace}")


async def test_claim_on_a_warm_pool_hands_over_a_running_container_without_starting_one(pool_settings) -> None:
    settings = pool_settings(default_pool={"min": 2, "max": 4})
    async with Engine.open(settings) as engine:
        await wait_for_pool(engine, warm=2)
        warm = {r.id: r.container_id for r in await live_runtimes(engine) if r.state == RuntimeState.WARM}
        info = await engine.sandboxes.create(engine.operator)
        row = await engine.store.get(Sandbox, info.sandbox_id)
        assert row.runtime_id in warm and row.container_id == warm[row.runtime_id]
        assert row.served_warm
        # The pool refills behind the claim: two warm again, one claimed.
        refilled = await wait_for_pool(engine, warm=2)
        assert (refilled.claimed, refilled.claims_warm, refilled.claims_cold) == (1, 1, 0)
        assert (await engine.sandboxes.exec(engine.operator, info.sandbox_id, "echo ready")).stdout == "ready\n"


async def test_full_pool_queues_claims_fairly_between_workspaces(pool_settings) -> None:
    """Max 1: while one sandbox is held, a's three claims and b's one wait; b does not wait behind all of a's."""
    settings = pool_settings(default_pool={"min": 0, "max": 1})
    async with Engine.open(settings) as engine:
        held = await engine.sandboxes.create(who("a"))
        served: list[str] = []
        sandboxes: dict[str, str] = {}

        async def claim(name: str, workspace: str) -> None:
            info = await engine.sandboxes.create(who(workspace))
            served.append(name)
            sandboxes[name] = info.sandbox_id

        async with anyio.create_task_group() as tg:
            for name, workspace in (("a1", "a"), ("a2", "a"), ("a3", "a"), ("b1", "b")):
                tg.start_soon(claim, name, workspace)
                await anyio.sleep(0.05)
            with anyio.fail_after(10):
                while (await pool_info(engine)).queue_depth < 4:
                    await anyio.sleep(0.05)
            current = (who("a"), held.sandbox_id)
            for _ in range(4):
                count = len(served)
                await engine.sandboxes.destroy(*current)
                with anyio.fail_after(30):
                    while len(served) == count:
                        await anyio.sleep(0.02)
                name = served[-1]
                current = (who(name[0]), sandboxes[name])
            await engine.sandboxes.destroy(*current)
        assert served == ["a1", "b1", "a2", "a3"]


async def test_claim_on_a_full_pool_times_out_with_a_clear_error_and_leaves_nothing(pool_settings) -> None:
    settings = pool_settings(default_pool={"min": 0, "max": 1}, pool={"claim_timeout_s": 1.0})
    async with Engine.open(settings) as engine:
        await engine.sandboxes.create(engine.operator)
        with pytest.raises(PoolExhaustedError) as caught:
            await engine.sandboxes.create(engine.operator)
        assert "at its max of 1" in str(caught.value) and "destroy a sandbox" in str(caught.value)
        info = await pool_info(engine)
        assert (info.claimed, info.queue_depth) == (1, 0)
        assert len(await live_runtimes(engine)) == 1
        assert len(await engine.sandboxes.list(engine.operator)) == 1


async def test_recycled_runtime_carries_nothing_from_its_previous_owner(pool_settings) -> None:
    """Max 1 forces the next claim onto the very same container after it is wiped."""
    settings = pool_settings(default_pool={"min": 1, "max": 1})
    async with Engine.open(settings) as engine:
        first = await engine.sandboxes.create(who("a"))
        litter = (
            "echo secret > /workspace/secret.txt && mkdir -p /workspace/.hidden/deep && chmod 000 /workspace/.hidden; "
            "echo tmp > /tmp/left && echo shm > /dev/shm/left; "
            "echo 'export STOLEN=1' >> ~/.bashrc && git config --global user.name intruder; "
            "ipcmk -M 4096 >/dev/null; "
            "setsid nohup sleep 1000 >/dev/null 2>&1 & nohup python3 -c 'import time; time.sleep(1000)' >/dev/null 2>&1 &"
        )
        assert (await engine.sandboxes.exec(who("a"), first.sandbox_id, litter)).exit_code == 0
        runtime_id = (await engine.store.get(Sandbox, first.sandbox_id)).runtime_id
        await engine.sandboxes.destroy(who("a"), first.sandbox_id)

        second = await engine.sandboxes.create(who("b"))
        assert (await engine.store.get(Sandbox, second.sandbox_id)).runtime_id == runtime_id  # same container
        look = (
            "ls -A /workspace /tmp /dev/shm; cmp ~/.bashrc /etc/skel/.bashrc && echo bashrc-fresh; "
            "git config --global user.name || echo no-git-name; echo ipc:$(ipcs -m | grep -c 0x); "
            "ps -eo pid=,args= | grep -v -e 'ps -eo' -e grep -e docker-init -e supervisor.py -e 'bash -c' || true"
        )
        seen = await engine.sandboxes.exec(who("b"), second.sandbox_id, look)
        assert "secret" not in seen.stdout and "left" not in seen.stdout and ".hidden" not in seen.stdout
        assert "bashrc-fresh" in seen.stdout and "no-git-name" in seen.stdout and "ipc:0" in seen.stdout
        assert "sleep 1000" not in seen.stdout and "time.sleep" not in seen.stdout, seen.stdout
        reasons = await event_reasons(engine, runtime_id)
        assert "recycled: wiped and verified clean" in reasons


async def test_runtime_left_with_a_fork_bomb_is_never_handed_over_dirty(pool_settings) -> None:
    settings = pool_settings(default_pool={"min": 1, "max": 1})
    async with Engine.open(settings) as engine:
        first = await engine.sandboxes.create(who("a"))
        bomb = "nohup bash -c 'b(){ b|b& }; b' >/dev/null 2>&1 & sleep 1; echo started"
        await engine.sandboxes.exec(who("a"), first.sandbox_id, bomb, timeout_s=20)
        await engine.sandboxes.destroy(who("a"), first.sandbox_id)
        second = await engine.sandboxes.create(who("b"))
        seen = await engine.sandboxes.exec(who("b"), second.sandbox_id, "ps -eo args= | grep -c '^bash -c b' || true")
        assert seen.stdout.strip() == "0", seen
        runtime_id = (await engine.store.get(Sandbox, first.sandbox_id)).runtime_id
        final = (await engine.store.get(Runtime, runtime_id)).state
        assert final in (RuntimeState.CLAIMED, RuntimeState.DESTROYED)  # wiped and reused, or replaced


async def test_warm_container_killed_outside_is_evicted_at_once_and_replaced(
    pool_settings, docker_client: docker.DockerClient
) -> None:
    """The health loop is slowed to ten minutes here: Docker's die event alone must do it."""
    settings = pool_settings(default_pool={"min": 2, "max": 4}, pool={"health_interval_s": 600})
    async with Engine.open(settings) as engine:
        await wait_for_pool(engine, warm=2)
        victim, survivor = [r for r in await live_runtimes(engine) if r.state == RuntimeState.WARM]
        docker_client.containers.get(victim.container_id).kill()
        with anyio.fail_after(30):
            while (await engine.store.get(Runtime, victim.id)).state != RuntimeState.DESTROYED:
                await anyio.sleep(0.05)
        await wait_for_pool(engine, warm=2, within_s=30)
        warm_now = {r.id for r in await live_runtimes(engine) if r.state == RuntimeState.WARM}
        assert survivor.id in warm_now and victim.id not in warm_now
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(victim.container_id)
        reasons = await event_reasons(engine, victim.id)
        assert any("died outside dockyard" in reason for reason in reasons), reasons


async def test_health_loop_evicts_a_warm_runtime_that_fails_its_probe(
    pool_settings, docker_client: docker.DockerClient
) -> None:
    settings = pool_settings(default_pool={"min": 1, "max": 2}, pool={"health_interval_s": 0.5})
    async with Engine.open(settings) as engine:
        await wait_for_pool(engine, warm=1)
        (tampered,) = [r for r in await live_runtimes(engine) if r.state == RuntimeState.WARM]
        # Planted without a process in the container (an exec's own process could be what the
        # probe notices first).
        docker_client.containers.get(tampered.container_id).put_archive("/workspace", _tar("planted", b"x"))
        with anyio.fail_after(30):
            while (await engine.store.get(Runtime, tampered.id)).state != RuntimeState.DESTROYED:
                await anyio.sleep(0.1)
        await wait_for_pool(engine, warm=1)
        reasons = await event_reasons(engine, tampered.id)
        assert any("unhealthy" in r and "planted" in r for r in reasons), reasons


async def test_autoscaler_grows_on_misses_and_shrinks_only_after_the_idle_hysteresis(pool_settings) -> None:
    settings = pool_settings(
        default_pool={"min": 1, "max": 4},
        pool={"autoscale_enabled": True, "autoscale_interval_s": 0.3, "scale_down_after_s": 4.0},
    )
    async with Engine.open(settings) as engine:
        await wait_for_pool(engine, warm=1)
        first_claim = time.monotonic()  # no claim can miss before this, so no shrink before +4 s
        held = [await engine.sandboxes.create(engine.operator) for _ in range(3)]  # one warm, the rest miss
        with anyio.fail_after(30):
            while (await pool_info(engine)).target <= 1:
                await anyio.sleep(0.05)
        await anyio.sleep(1.0)  # a few ticks: every miss has been counted
        grown = await pool_info(engine)
        for sandbox in held:
            await engine.sandboxes.destroy(engine.operator, sandbox.sandbox_id)
        targets = []
        with anyio.fail_after(60):
            while (info := await pool_info(engine)).target > 1:
                targets.append((time.monotonic() - first_claim, info.target))
                await anyio.sleep(0.1)
        shrunk_at = [t for t, target in targets if target < grown.target]
        assert not shrunk_at or shrunk_at[0] >= 3.9, targets  # no shrinking inside the hysteresis window
        assert [target for _, target in targets] == sorted((target for _, target in targets), reverse=True)
        settled = await wait_for_pool(engine, warm=1)
        assert settled.target == 1


async def test_many_concurrent_creates_never_share_a_runtime(pool_settings) -> None:
    """One workspace may fill this pool (workspace_pool_share 1): the claims race for all of it."""
    settings = pool_settings(default_pool={"min": 2, "max": 6}, quotas={"workspace_pool_share": 1.0})
    async with Engine.open(settings) as engine:
        await wait_for_pool(engine, warm=2)
        made: list[str] = []

        async def create() -> None:
            made.append((await engine.sandboxes.create(engine.operator)).sandbox_id)

        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(create)
        rows = await engine.store.run(lambda s: list(s.exec(select(Sandbox).where(col(Sandbox.id).in_(made))).all()))
        assert len({r.runtime_id for r in rows}) == 6 and len({r.container_id for r in rows}) == 6
        assert sum(r.served_warm for r in rows) == 2


async def test_a_workspace_at_its_share_stays_there_across_a_restart_while_another_is_served(pool_settings) -> None:
    """Max 2, share 1: the holder of a claimed runtime is on its row, so a restart does not
    forget it and hand workspace a the pool's last place."""
    settings = pool_settings(default_pool={"min": 0, "max": 2}, pool={"claim_timeout_s": 1.0})
    async with Engine.open(settings) as engine:
        await engine.sandboxes.create(who("a"))
    async with Engine.open(settings) as engine:
        with pytest.raises(
            QuotaExceededError, match="quota workspace_pool_share reached: workspace 'a' holds 1 of pool 'default'"
        ):
            await engine.sandboxes.create(who("a"))
        theirs = await engine.sandboxes.create(who("b"))
        assert (await engine.sandboxes.exec(who("b"), theirs.sandbox_id, "echo b")).stdout == "b\n"
        assert (await pool_info(engine)).claimed == 2


def _tar(name: str, data: bytes) -> bytes:
    """A tar archive holding one file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
