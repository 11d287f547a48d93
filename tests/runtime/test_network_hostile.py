"""A sandbox's network reaches what its mode promises and nothing of this host or its neighbours.

The attacker runs inside a sandbox on `workspace` or `internet` and tries every address of
this host (each interface, its own bridge's gateway, docker0's), a container on Docker's
default bridge, and another workspace's sandbox; a listener of the test answers on each.
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest

from dockyard.runtime.engine import Engine, instance_id
from dockyard.runtime.substrate.settings import Identity, Settings
from dockyard.runtime.substrate.store import Sandbox
from tests.conftest import make_settings, remove_instance

pytestmark = pytest.mark.anyio

SECRET = "host-secret"
PEER = "peer-answer"
# Serves PEER on port 8000 inside a sandbox, in the background.
SERVE_PEER = (
    "nohup python3 -c \"import socket; s = socket.socket(); s.bind(('0.0.0.0', 8000)); s.listen()\n"
    f"while True: c, _ = s.accept(); c.sendall(b'{PEER}'); c.close()\" >/dev/null 2>&1 & sleep 0.5"
)


@pytest.fixture
def host_listener() -> Iterator[int]:
    """A service of this host on every interface: what no sandbox may reach."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.sendall(SECRET.encode())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


@pytest.fixture
def engine_settings(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> Iterator[Callable[..., Settings]]:
    made: list[Settings] = []

    def make(**overrides: object) -> Settings:
        settings = make_settings(tmp_path / f"data{len(made)}", sandbox={"allow_internet": True}, **overrides)
        made.append(settings)
        return settings

    yield make
    for settings in made:
        remove_instance(docker_client, settings)


@pytest.fixture
def bystander(docker_client: docker.DockerClient, sandbox_image: str) -> Iterator[str]:
    """A container of someone else on Docker's default bridge, answering PEER on port 8000."""
    container = docker_client.containers.run(
        sandbox_image,
        ["python3", "-c", SERVE_PEER.split('"')[1].replace("\\n", "\n")],
        detach=True,
        network="bridge",
        labels={"dockyard.test": "network-bystander"},
        user="agent",
    )
    try:
        container.reload()
        yield container.attrs["NetworkSettings"]["Networks"]["bridge"]["IPAddress"]
    finally:
        container.remove(force=True)


def who(workspace: str) -> Identity:
    return Identity(workspace_id=workspace, project_id="p", user_id=f"user-{workspace}")


def host_addresses(docker_client: docker.DockerClient) -> set[str]:
    """Every IPv4 address of this host but loopback (docker0's and every bridge's gateway among them)."""
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    found = {line.split()[3].split("/")[0] for line in shown.splitlines()}
    return found - {"127.0.0.1"}


def address_of(docker_client: docker.DockerClient, row: Sandbox) -> tuple[str, str]:
    """A sandbox's address and its network's gateway."""
    networks = docker_client.containers.get(row.container_id).attrs["NetworkSettings"]["Networks"]
    (net,) = networks.values()
    return net["IPAddress"], net["Gateway"]


def probe(targets: list[tuple[str, int]]) -> str:
    """A command that tries every target at once, 3 s each, printing `ip:port=answer` lines."""
    tries = " ".join(
        f"(echo {ip}:{port}=$(timeout 3 bash -c 'exec 3<>/dev/tcp/{ip}/{port} && head -c 64 <&3' 2>/dev/null)) &"
        for ip, port in targets
    )
    return f"{tries} wait"


def answers(output: str) -> dict[str, str]:
    return {line.split("=", 1)[0]: line.split("=", 1)[1] for line in output.splitlines() if "=" in line}


async def test_a_workspace_network_reaches_its_own_sandboxes_and_no_address_of_this_host(
    engine_settings, host_listener: int, docker_client: docker.DockerClient
) -> None:
    async with Engine.open(engine_settings()) as engine:
        peer = await engine.sandboxes.create(who("a"), network="workspace")
        attacker = await engine.sandboxes.create(who("a"), network="workspace")
        await engine.sandboxes.exec(who("a"), peer.sandbox_id, SERVE_PEER)
        peer_ip, _ = address_of(docker_client, await engine.store.get(Sandbox, peer.sandbox_id))
        _, gateway = address_of(docker_client, await engine.store.get(Sandbox, attacker.sandbox_id))
        host = sorted(host_addresses(docker_client) | {gateway})
        seen = answers(
            (
                await engine.sandboxes.exec(
                    who("a"),
                    attacker.sandbox_id,
                    probe([(peer_ip, 8000), *((ip, host_listener) for ip in host)]),
                    timeout_s=30,
                )
            ).stdout
        )
        assert seen[f"{peer_ip}:8000"] == PEER  # its own workspace's runtimes answer
        reached = {target: said for target, said in seen.items() if SECRET in said}
        assert reached == {}, f"this host answered a workspace sandbox on {sorted(reached)}"
        assert len(seen) == len(host) + 1


async def test_internet_sandboxes_reach_neither_this_host_nor_another_workspace_nor_a_private_neighbour(
    engine_settings, host_listener: int, docker_client: docker.DockerClient, bystander: str
) -> None:
    async with Engine.open(engine_settings()) as engine:
        victim = await engine.sandboxes.create(who("a"), network="internet")
        colleague = await engine.sandboxes.create(who("a"), network="internet")
        attacker = await engine.sandboxes.create(who("b"), network="internet")
        await engine.sandboxes.exec(who("a"), victim.sandbox_id, SERVE_PEER)
        victim_ip, _ = address_of(docker_client, await engine.store.get(Sandbox, victim.sandbox_id))
        attacker_ip, gateway = address_of(docker_client, await engine.store.get(Sandbox, attacker.sandbox_id))
        assert victim_ip.rsplit(".", 1)[0] != attacker_ip.rsplit(".", 1)[0]  # a bridge of each workspace's own
        host = sorted(host_addresses(docker_client) | {gateway})
        targets = [(victim_ip, 8000), (bystander, 8000), *((ip, host_listener) for ip in host)]
        seen = answers(
            (await engine.sandboxes.exec(who("b"), attacker.sandbox_id, probe(targets), timeout_s=30)).stdout
        )
        assert len(seen) == len(targets)
        reached = {target: said for target, said in seen.items() if said}
        assert reached == {}, f"an internet sandbox of workspace b reached {reached}"
        routes = (await engine.sandboxes.exec(who("b"), attacker.sandbox_id, "cat /proc/net/route")).stdout
        assert "\t00000000\t" in routes  # it does have a way out, to the public internet
        # the victim's own workspace still reaches it: the rules cut only what must not be reached
        own = answers((await engine.sandboxes.exec(who("a"), colleague.sandbox_id, probe([(victim_ip, 8000)]))).stdout)
        assert own == {f"{victim_ip}:8000": PEER}


async def test_the_rules_go_with_the_last_network_and_stay_while_sandboxes_run_on(
    engine_settings, docker_client: docker.DockerClient
) -> None:
    settings = engine_settings()
    chain = f"DOCKYARD-{instance_id(settings)}-IN"

    def has_rules() -> bool:
        return subprocess.run(["iptables", "-w", "5", "-S", chain], capture_output=True).returncode == 0

    async with Engine.open(settings) as engine:
        kept = await engine.sandboxes.create(who("a"), network="workspace")
        assert has_rules()
    assert has_rules()  # its sandbox runs on while the server is away: still guarded
    async with Engine.open(settings) as engine:
        await engine.sandboxes.destroy(who("a"), kept.sandbox_id)
    assert not has_rules()  # no network of this instance is left
