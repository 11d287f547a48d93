"""A sandbox's writes stop at its disk size, inside the sandbox; the host's disk never pays.

The attacker fills `/workspace`, then the home, then tries a sparse file and many small ones;
each write past the template's `disk_mb` fails with "No space left on device" and the host's
free space stays where it was. The sandbox keeps working once it frees space.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import docker
import pytest
from mcp import Client

from dockyard.runtime.substrate.settings import Settings
from dockyard.server.app import build_server
from tests.conftest import call, make_settings, remove_instance, sh

pytestmark = pytest.mark.anyio

DISK_MB = 64


@pytest.fixture
def small_disk(tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient) -> Iterator[Settings]:
    settings = make_settings(
        tmp_path / "data", templates={"default": {"disk_mb": DISK_MB, "pool": {"min": 1, "max": 4}}}
    )
    yield settings
    remove_instance(docker_client, settings)
    assert not list((settings.data_dir / "disks").glob("rt_*"))  # every disk unmounted and deleted


@pytest.fixture
async def client(small_disk: Settings) -> AsyncIterator[Client]:
    async with Client(build_server(small_disk)) as connected:
        yield connected


def host_free(settings: Settings) -> int:
    return shutil.disk_usage(settings.data_dir).free


async def test_a_write_past_the_disk_fails_inside_with_no_space_and_the_host_keeps_its_free_space(
    client: Client, small_disk: Settings
) -> None:
    sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
    before = host_free(small_disk)
    flood = await sh(client, sandbox_id, "head -c 300M /dev/zero > /workspace/flood", timeout_s=60)
    assert flood["exit_code"] != 0 and "No space left on device" in flood["stderr"], flood
    home = await sh(client, sandbox_id, "head -c 1M /dev/zero > ~/more", timeout_s=30)
    assert home["exit_code"] != 0 and "No space left on device" in home["stderr"], home  # one disk for both
    many = await sh(
        client, sandbox_id, "for i in $(seq 1 200000); do : > /workspace/f$i || exit 7; done", timeout_s=120
    )
    assert many["exit_code"] == 7, many  # inodes are bounded too
    # a sparse file may claim any size; its data still has to fit
    sparse = await sh(
        client,
        sandbox_id,
        "rm -f /workspace/f* && truncate -s 10G /workspace/sparse && "
        "dd if=/dev/zero of=/workspace/sparse bs=1M count=300 conv=notrunc 2>&1",
        timeout_s=60,
    )
    assert "No space left on device" in sparse["stdout"], sparse
    assert before - host_free(small_disk) < 2 * DISK_MB << 20  # at most the disk's own size, not 300 MiB
    df = await sh(client, sandbox_id, "df -BM --output=size /workspace | tail -1")
    assert int(df["stdout"].strip().rstrip("M")) <= DISK_MB
    freed = await sh(
        client,
        sandbox_id,
        "rm -f /workspace/flood /workspace/sparse && echo ok > /workspace/after && cat /workspace/after",
    )
    assert freed["stdout"] == "ok\n"  # the sandbox works on once it frees space


async def test_each_sandbox_has_a_disk_of_its_own_and_a_recycled_one_starts_empty(
    client: Client, small_disk: Settings
) -> None:
    first = (await call(client, "sandbox_create"))["sandbox_id"]
    second = (await call(client, "sandbox_create"))["sandbox_id"]
    assert (await sh(client, first, "head -c 40M /dev/zero > /workspace/half", timeout_s=60))["exit_code"] == 0
    # the neighbour's disk is its own: 40 MiB used next door takes nothing from it
    assert (await sh(client, second, "head -c 40M /dev/zero > /workspace/half", timeout_s=60))["exit_code"] == 0
    await call(client, "sandbox_destroy", sandbox_id=first)
    third = (await call(client, "sandbox_create"))["sandbox_id"]
    listed, used = (await sh(client, third, "ls -A /workspace | wc -l; df -BM --output=used /workspace | tail -1"))[
        "stdout"
    ].split()
    assert listed == "0" and int(used.rstrip("M")) < 8, (listed, used)
