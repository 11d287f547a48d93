"""Computers on real Docker: a warm headless Chromium in a hardened container with no network,
reached over its DevTools socket; destroyed (never wiped and reused) after a claim; replaced
when its browser dies or stops answering. Claims go through the pool itself, as the computer
service's do."""

from __future__ import annotations

import secrets
import stat
from pathlib import Path

import anyio
import docker
import docker.errors
import pytest
from sqlmodel import Session

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.errors import BackendError, InvalidRequestError
from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import Runtime, RuntimeState
from tests.conftest import make_settings, remove_instance
from tests.runtime.pooltools import event_reasons, live_runtimes, wait_for_pool

pytestmark = pytest.mark.anyio

# The browser's main process: Chromium's binary without a --type (its helpers all have one).
# Signalled as the browser's own user: root in the container holds no CAP_KILL to do it.
_SIGNAL_BROWSER = r"""
for p in /proc/[0-9]*; do
  cmd=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null)
  case "$cmd" in
    /usr/lib/chromium/chromium*--type=*) ;;
    /usr/lib/chromium/chromium*) kill -{signal} "${{p#/proc/}}" && echo "${{p#/proc/}}" ;;
  esac
done
"""


@pytest.fixture
def computer_settings(tmp_path: Path, computer_image: str, docker_client: docker.DockerClient):
    """Settings for one test's computer pool (no warm sandboxes); every instance is cleaned up."""
    made: list[Settings] = []

    def make(**overrides: object) -> Settings:
        settings = make_settings(tmp_path / f"data{len(made)}", default_pool={"min": 0, "max": 2}, **overrides)
        made.append(settings)
        return settings

    yield make
    for settings in made:
        remove_instance(docker_client, settings)


def _no_owner(session: Session, runtime: Runtime) -> None:
    """A claim's or release's owner side: these tests hold runtimes without an owner record."""


async def warm_computers(engine: Engine) -> list[Runtime]:
    return [r for r in await live_runtimes(engine) if r.template == "computer" and r.state == RuntimeState.WARM]


async def wait_for_state(engine: Engine, runtime_id: str, state: str, within_s: float = 30) -> None:
    with anyio.fail_after(within_s):
        while (await engine.store.get(Runtime, runtime_id)).state != state:
            await anyio.sleep(0.1)


def signal_browser(docker_client: docker.DockerClient, container_id: str, signal: str) -> None:
    container = docker_client.containers.get(container_id)
    result = container.exec_run(["bash", "-c", _SIGNAL_BROWSER.format(signal=signal)], user="1000:1000")
    # The exec's own exit status is no evidence: a killed browser takes its container, and the
    # exec with it, down at once. The pid it printed is.
    assert result.output.strip().isdigit(), result


async def test_a_warm_computer_is_a_hardened_headless_chromium_reached_over_its_socket(
    computer_settings, docker_client: docker.DockerClient
) -> None:
    settings = computer_settings(computer_pool={"min": 1, "max": 2})
    async with Engine.open(settings) as engine:
        await wait_for_pool(engine, warm=1, template="computer", within_s=90)
        (computer,) = await warm_computers(engine)
        info = docker_client.api.inspect_container(computer.container_id)
        host = info["HostConfig"]
        assert info["Config"]["User"] == "1000:1000"
        assert host["CapDrop"] == ["ALL"] and not host["CapAdd"] and not host["Privileged"]
        assert "no-new-privileges:true" in host["SecurityOpt"]
        assert host["ReadonlyRootfs"] and host["NetworkMode"] == "none"
        assert host["PidsLimit"] == 512 and host["Memory"] == host["MemorySwap"] == 1024 << 20
        assert host["NanoCpus"] == 1_000_000_000
        assert host["Tmpfs"] == {"/tmp": "rw,nosuid,nodev,noexec,size=512m,mode=1777"}
        assert info["Config"]["Labels"]["dockyard.kind"] == "computer"
        assert host["Binds"] == [f"{engine.provisioner.cdp_socket(computer.id).parent}:/run/dockyard-cdp:rw"]

        # Nothing in it runs as root, and it has no network interface but loopback.
        inside = docker_client.containers.get(computer.container_id).exec_run(
            [
                "bash",
                "-c",
                "cat /proc/[0-9]*/status 2>/dev/null | awk '/^Uid:/ {print $2}' | sort -u; "
                "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '",
            ],
            user="1000:1000",
        )
        assert inside.output.decode().split() == ["1000", "lo"], inside.output

        version = await engine.provisioner.browser_version(computer.id)
        assert version["Browser"].startswith("Chrome/") and version["webSocketDebuggerUrl"].startswith("ws://")
        socket = engine.provisioner.cdp_socket(computer.id)
        assert stat.S_ISSOCK(socket.stat().st_mode)
        assert stat.S_IMODE(socket.parent.parent.stat().st_mode) == 0o700  # only this server's user gets in
        assert await engine.provisioner.leftovers(computer.container_id, computer.id, "computer") == []


async def test_a_released_computer_is_destroyed_never_reused_and_replaced_by_a_fresh_one(
    computer_settings, docker_client: docker.DockerClient
) -> None:
    """Max 1: the fresh computer can only appear once the released one is gone."""
    settings = computer_settings(computer_pool={"min": 1, "max": 1})
    async with Engine.open(settings) as engine:
        await wait_for_pool(engine, warm=1, template="computer", within_s=90)
        (first,) = await warm_computers(engine)
        lease = await engine.pools.claim("computer", "ws-a", _no_owner, network="none")
        assert lease.warm and lease.runtime.id == first.id

        await engine.pools.release(first.id, _no_owner, "its owner is done")
        await wait_for_state(engine, first.id, RuntimeState.DESTROYED)
        reasons = await event_reasons(engine, first.id)
        assert "a computer is never reused: a fresh browser keeps no cookies, storage or history" in reasons, reasons
        assert not any("recycled" in reason for reason in reasons), reasons
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(first.container_id)
        assert not engine.provisioner.cdp_socket(first.id).parent.exists()

        await wait_for_pool(engine, warm=1, template="computer", within_s=60)
        (fresh,) = await warm_computers(engine)
        assert fresh.id != first.id and fresh.container_id != first.container_id
        assert (await engine.provisioner.browser_version(fresh.id))["Browser"].startswith("Chrome/")


async def test_a_warm_computer_whose_browser_is_killed_is_evicted_and_replaced(
    computer_settings, docker_client: docker.DockerClient
) -> None:
    """The browser's death stops its container (computer-start exits), and the pool acts on that."""
    settings = computer_settings(computer_pool={"min": 1, "max": 2}, pool={"health_interval_s": 0.5})
    async with Engine.open(settings) as engine:
        await wait_for_pool(engine, warm=1, template="computer", within_s=90)
        (victim,) = await warm_computers(engine)
        signal_browser(docker_client, victim.container_id, "KILL")
        await wait_for_state(engine, victim.id, RuntimeState.DESTROYED)
        reasons = await event_reasons(engine, victim.id)
        assert any(reason.startswith("unhealthy") for reason in reasons), reasons

        await wait_for_pool(engine, warm=1, template="computer", within_s=60)
        (replacement,) = await warm_computers(engine)
        assert replacement.id != victim.id
        assert (await engine.provisioner.browser_version(replacement.id))["Browser"].startswith("Chrome/")


async def test_a_warm_computer_whose_browser_stops_answering_fails_the_health_probe(
    computer_settings, docker_client: docker.DockerClient
) -> None:
    """A frozen browser keeps its container running: only the DevTools probe can tell."""
    settings = computer_settings(computer_pool={"min": 1, "max": 2}, pool={"health_interval_s": 0.5})
    async with Engine.open(settings) as engine:
        await wait_for_pool(engine, warm=1, template="computer", within_s=90)
        (frozen,) = await warm_computers(engine)
        signal_browser(docker_client, frozen.container_id, "STOP")
        await wait_for_state(engine, frozen.id, RuntimeState.DESTROYED, within_s=60)
        reasons = await event_reasons(engine, frozen.id)
        assert any("unhealthy" in r and "does not answer on its DevTools socket" in r for r in reasons), reasons
        await wait_for_pool(engine, warm=1, template="computer", within_s=60)


async def test_computer_templates_are_refused_where_a_sandbox_or_a_network_is_asked(computer_settings) -> None:
    settings = computer_settings()  # no warm computer: nothing here may start one
    stray = settings.data_dir / "cdp" / "rt_left_by_a_crash"
    stray.mkdir(parents=True)
    async with Engine.open(settings) as engine:
        assert not stray.exists()  # reconciliation swept it: its runtime is not live

        with pytest.raises(InvalidRequestError) as refused:
            await engine.sandboxes.create(engine.operator, template="computer")
        assert "template 'computer' is a computer; use computer_create" in str(refused.value)
        assert "sandbox templates: default" in str(refused.value)

        with pytest.raises(InvalidRequestError) as networked:
            await engine.pools.claim("computer", "ws-a", _no_owner, network="workspace")
        assert "a computer never has a network" in str(networked.value)
        assert [r for r in await live_runtimes(engine) if r.template == "computer"] == []


async def test_a_computer_whose_browser_never_starts_fails_fast_and_leaves_nothing(
    tmp_path: Path, computer_settings, computer_image: str, docker_client: docker.DockerClient
) -> None:
    recipe = f"nobrowser-{secrets.token_hex(3)}"
    folder = tmp_path / "recipes" / recipe
    folder.mkdir(parents=True)
    (folder / "Dockerfile").write_text(
        f'ARG BASE_IMAGE\nFROM {computer_image}\nCMD ["bash", "-c", "echo no browser in here >&2; exit 3"]\n'
    )
    settings = computer_settings(
        images={"recipes_dir": str(tmp_path / "recipes")},
        templates={"default": {"pool": {"min": 0}}, "broken": {"kind": "computer", "image": recipe}},
    )
    try:
        async with Engine.open(settings) as engine:
            with anyio.fail_after(600):  # the build first: on a loaded host it can outlast a claim's wait
                await engine.images.ensure(recipe)
            with anyio.fail_after(60):  # a start that must not wait out its 30 s
                with pytest.raises(BackendError) as failed:
                    await engine.pools.claim("broken", "ws-a", _no_owner, network="none")
            assert "stopped before its browser answered: no browser in here" in str(failed.value)
            assert [r for r in await live_runtimes(engine) if r.template == "broken"] == []
            assert list((settings.data_dir / "cdp").iterdir()) == []
            ours = [f"dockyard.instance={engine.instance}", "dockyard.template=broken"]
            assert docker_client.containers.list(all=True, filters={"label": ours}) == []
    finally:
        docker_client.images.remove(f"dockyard/{recipe}:latest", force=True)
