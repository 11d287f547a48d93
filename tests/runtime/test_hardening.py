"""A sandbox container is locked down: inspected from outside with Docker, probed from inside.

Every check here is something a hostile command would otherwise exploit: root, capabilities,
a writable root filesystem, the Docker socket, a network, unlimited processes or memory.
"""

from __future__ import annotations

from typing import Any

import docker
import pytest
from mcp import Client

from dockyard.runtime.engine import instance_id
from dockyard.runtime.substrate.settings import Settings
from tests.conftest import call, container_of, sandbox_row, sh

pytestmark = pytest.mark.anyio

DOCKER_SOCKET = "/var/run/docker.sock"


async def create(client: Client, **arguments: Any) -> str:
    return (await call(client, "sandbox_create", **arguments))["sandbox_id"]


async def test_container_drops_every_capability_and_blocks_privilege_escalation(
    client: Client, docker_client: docker.DockerClient, settings: Settings
) -> None:
    host = container_of(docker_client, settings, await create(client))["HostConfig"]
    assert "ALL" in (host["CapDrop"] or [])
    # Only the supervisor's: acting as the sandbox user and stopping that user's processes.
    assert sorted(cap.removeprefix("CAP_") for cap in host.get("CapAdd") or []) == ["KILL", "SETGID", "SETUID"]
    assert not host["Privileged"]
    assert any(opt.startswith("no-new-privileges") for opt in host["SecurityOpt"] or [])


async def test_commands_run_as_the_sandbox_user_with_no_capabilities(client: Client) -> None:
    sandbox_id = await create(client)
    seen = (await sh(client, sandbox_id, "id -un; grep -E '^Cap(Eff|Prm|Amb):' /proc/self/status"))["stdout"]
    lines = seen.split()
    assert lines[0] == "agent"
    assert lines[1:] == ["CapPrm:", "0000000000000000", "CapEff:", "0000000000000000", "CapAmb:", "0000000000000000"], (
        seen
    )


async def test_container_has_pid_memory_and_cpu_limits_with_swap_equal_to_memory(
    client: Client, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """Swap equal to memory means no extra swap: a memory bomb is OOM-killed, not swapped out."""
    sandbox_id = await create(client, memory_mb=512, cpus=0.5)
    host = container_of(docker_client, settings, sandbox_id)["HostConfig"]
    assert host["PidsLimit"] and 0 < host["PidsLimit"] <= 4096
    assert host["Memory"] == 512 * 1024 * 1024
    assert host["MemorySwap"] == host["Memory"]
    assert host["NanoCpus"] == 500_000_000


async def test_container_root_filesystem_is_read_only_and_docker_socket_is_not_mounted(
    client: Client, docker_client: docker.DockerClient, settings: Settings
) -> None:
    info = container_of(docker_client, settings, await create(client))
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    sources = [mount.get("Source", "") for mount in info["Mounts"]]
    destinations = [mount.get("Destination", "") for mount in info["Mounts"]]
    assert not any(src.endswith("docker.sock") for src in sources), sources
    assert DOCKER_SOCKET not in destinations
    assert not any("docker.sock" in bind for bind in info["HostConfig"].get("Binds") or [])


async def test_container_has_no_network_by_default(
    client: Client, docker_client: docker.DockerClient, settings: Settings
) -> None:
    info = container_of(docker_client, settings, await create(client))
    assert info["HostConfig"]["NetworkMode"] == "none"


async def test_container_labels_name_its_instance_runtime_and_template_and_the_store_its_owner(
    client: Client, docker_client: docker.DockerClient, settings: Settings
) -> None:
    """Docker labels cannot change after a container starts, and a warm runtime has no owner
    yet: the labels say whose dockyard instance and which runtime it is, the store says who holds it."""
    sandbox_id = await create(client)
    labels = container_of(docker_client, settings, sandbox_id)["Config"]["Labels"]
    row = sandbox_row(settings, sandbox_id)
    assert labels["dockyard.instance"] == instance_id(settings)
    assert labels["dockyard.runtime"] == row.runtime_id
    assert labels["dockyard.kind"] == "sandbox"
    assert labels["dockyard.template"] == "default"
    assert (row.workspace_id, row.user_id) == (settings.operator.workspace_id, settings.operator.user_id)


async def test_commands_run_as_unprivileged_user_without_effective_capabilities(client: Client) -> None:
    sandbox_id = await create(client)
    ident = await sh(client, sandbox_id, "id -u; id -g; id -un")
    assert ident["exit_code"] == 0
    assert ident["stdout"].split() == ["1000", "1000", "agent"]
    status = await sh(client, sandbox_id, "grep -E '^Cap(Eff|Prm|Amb):' /proc/self/status")
    caps = dict(line.split(":\t") for line in status["stdout"].strip().splitlines())
    assert caps == {"CapEff": "0000000000000000", "CapPrm": "0000000000000000", "CapAmb": "0000000000000000"}
    no_new_privs = await sh(client, sandbox_id, "grep '^NoNewPrivs:' /proc/self/status")
    assert no_new_privs["stdout"].split() == ["NoNewPrivs:", "1"]


@pytest.mark.parametrize("target", ["/etc/dockyard-probe", "/usr/dockyard-probe", "/dockyard-probe", "/root/probe"])
async def test_writes_outside_workspace_tmp_and_home_fail(client: Client, target: str) -> None:
    sandbox_id = await create(client)
    result = await sh(client, sandbox_id, f"echo pwned > {target}")
    assert result["exit_code"] != 0
    assert "Read-only file system" in result["stderr"] or "Permission denied" in result["stderr"]
    assert (await sh(client, sandbox_id, f"test -e {target}"))["exit_code"] != 0


async def test_read_only_root_holds_even_for_files_the_user_owns(client: Client) -> None:
    """The sandbox user's own files outside /workspace, /tmp and home are not writable either."""
    sandbox_id = await create(client)
    result = await sh(client, sandbox_id, "touch /usr/local/bin/dockyard-helper")
    assert result["exit_code"] != 0
    assert "Read-only file system" in result["stderr"] or "Permission denied" in result["stderr"]


async def test_workspace_tmp_and_home_are_writable(client: Client) -> None:
    sandbox_id = await create(client)
    script = "echo w > /workspace/p && echo t > /tmp/p && echo h > ~/p && cat /workspace/p /tmp/p ~/p"
    result = await sh(client, sandbox_id, script)
    assert result["exit_code"] == 0, result["stderr"]
    assert result["stdout"].split() == ["w", "t", "h"]


async def test_only_loopback_interface_exists_and_nothing_is_reachable(client: Client) -> None:
    sandbox_id = await create(client)
    interfaces = await sh(client, sandbox_id, "ls /sys/class/net")
    assert interfaces["stdout"].split() == ["lo"]
    routes = await sh(client, sandbox_id, "tail -n +2 /proc/net/route")
    assert routes["stdout"].strip() == "", "a sandbox without a network has no route anywhere"


async def test_docker_socket_is_absent_inside_the_sandbox(client: Client) -> None:
    sandbox_id = await create(client)
    for path in (DOCKER_SOCKET, "/run/docker.sock"):
        assert (await sh(client, sandbox_id, f"test -e {path}"))["exit_code"] == 1, f"{path} exists in the sandbox"
    found = await sh(client, sandbox_id, "find / -xdev -name 'docker.sock' 2>/dev/null; true")
    assert "docker.sock" not in found["stdout"]


async def test_setuid_binaries_do_not_give_root(client: Client) -> None:
    """su, sudo and the setuid mount either are missing or fail: nothing runs as uid 0."""
    sandbox_id = await create(client)
    su = await sh(client, sandbox_id, "echo x | su -c 'id -u' root", timeout_s=20)
    assert su["exit_code"] != 0 and su["stdout"].strip() != "0"
    sudo = await sh(client, sandbox_id, "sudo -n id -u", timeout_s=20)
    assert sudo["exit_code"] != 0 and sudo["stdout"].strip() != "0"
    mount = await sh(client, sandbox_id, "mount -t tmpfs none /mnt")
    assert mount["exit_code"] != 0


async def test_nothing_in_workspace_can_be_renamed_out_of_it(client: Client) -> None:
    """/workspace is a mount of its own: a directory the file tools hold open stays inside it."""
    sandbox_id = await create(client)
    moves = (
        "import errno, os\n"
        "os.mkdir('d')\n"
        "for there in ('/home/agent/d', '/tmp/d', '/dev/shm/d'):\n"
        "    try:\n"
        "        os.rename('d', there)\n"
        "    except OSError as exc:\n"
        "        print(errno.errorcode[exc.errno])\n"
    )
    await call(client, "sandbox_write_file", sandbox_id=sandbox_id, path="move.py", content=moves)
    result = await sh(client, sandbox_id, "python3 move.py")
    assert result["stdout"].split() == ["EXDEV", "EXDEV", "EXDEV"], result
