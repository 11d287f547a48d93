"""Hostile commands against the supervisor's hold on them, through the MCP client.

The attacker is a command in its own sandbox; the assets are the timeout (nothing a timed-out
or cancelled command started may keep running, however it detached) and the supervisor itself
(no swarm of the sandbox's own processes may OOM-kill it, starve it or take every process slot
from it, so the sandbox is never lost to its own processes).
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from mcp import Client

from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import SandboxStatus
from tests.conftest import call, sandbox_row, sh

pytestmark = pytest.mark.anyio


async def create(client: Client, **arguments: Any) -> str:
    return (await call(client, "sandbox_create", **arguments))["sandbox_id"]


async def survivors(client: Client, sandbox_id: str, marker: str) -> list[str]:
    """Live processes of the sandbox whose command line carries `marker` (ps itself aside)."""
    table = (await sh(client, sandbox_id, "ps -eo pid,ppid,stat,args --no-headers"))["stdout"]
    return [line for line in table.splitlines() if marker in line and "ps -eo" not in line and " Z" not in line]


# Each escapes the command's process tree (its parent ends, so it is re-parented), leaves the
# command's session and drops dockyard's exec id from its environment.
DETACHED = {
    "double_fork": "(env -i setsid sleep 611 &); sleep 300",
    "setsid_fork": "env -i setsid --fork sleep 612; sleep 300",
    "nohup_daemon": "(env -i setsid nohup sleep 613 > /dev/null 2>&1 &); sleep 300",
    "python_daemon": (
        "python3 -c 'import os\n"
        "if os.fork(): os._exit(0)\n"
        "os.setsid()\n"
        "if os.fork(): os._exit(0)\n"
        "os.setpgid(0, 0)\n"
        'os.execve("/bin/sleep", ["sleep", "614"], {})\'; sleep 300'
    ),
}


@pytest.mark.parametrize("command", DETACHED.values(), ids=DETACHED.keys())
async def test_a_timed_out_command_cannot_leave_a_detached_process_behind(client: Client, command: str) -> None:
    sandbox_id = await create(client)
    with anyio.fail_after(60):
        result = await sh(client, sandbox_id, command, timeout_s=3)
    assert result["timed_out"] is True and result["exit_code"] == 124
    assert await survivors(client, sandbox_id, "sleep ") == []


async def test_a_detached_writer_stops_writing_when_its_command_times_out(client: Client) -> None:
    """A daemon with an empty environment that keeps working (appending to a file) and keeps
    changing its pid: each generation forks the next and ends, so it is always a new orphan."""
    sandbox_id = await create(client)
    hopper = (
        "env -i python3 -c 'import os, time\n"
        "if os.fork(): os._exit(0)\n"
        "os.setsid()\n"
        "while True:\n"
        "    if os.fork(): os._exit(0)\n"
        '    open("/workspace/marker", "a").write("x")\n'
        "    time.sleep(0.05)'; sleep 300"
    )
    with anyio.fail_after(60):
        result = await sh(client, sandbox_id, hopper, timeout_s=3)
    assert result["timed_out"] is True and result["exit_code"] == 124
    first = (await sh(client, sandbox_id, "stat -c %s marker"))["stdout"]
    assert int(first) > 0
    await anyio.sleep(1.0)
    assert (await sh(client, sandbox_id, "stat -c %s marker"))["stdout"] == first
    assert await survivors(client, sandbox_id, "import os") == []


async def test_a_cancelled_command_cannot_leave_a_detached_process_behind(client: Client) -> None:
    """The client gives up on the call: the supervisor kills the command as at a timeout."""
    sandbox_id = await create(client)
    with anyio.move_on_after(2) as waited:
        await client.call_tool(
            "sandbox_exec", {"sandbox_id": sandbox_id, "command": DETACHED["double_fork"], "timeout_s": 300}
        )
    assert waited.cancelled_caught
    with anyio.fail_after(30):
        while await survivors(client, sandbox_id, "sleep 611") or await survivors(client, sandbox_id, "sleep 300"):
            await anyio.sleep(0.2)


async def test_a_command_that_ends_by_itself_may_still_leave_a_server_running(client: Client) -> None:
    """The kill is for timeouts and cancels only: `nohup server &` outlives its command."""
    sandbox_id = await create(client)
    result = await sh(
        client, sandbox_id, "(env -i setsid nohup sleep 615 > /dev/null 2>&1 &); nohup sleep 616 > /dev/null 2>&1 &"
    )
    assert result["exit_code"] == 0 and not result["timed_out"]
    assert len(await survivors(client, sandbox_id, "sleep 61")) == 2


# -- the supervisor against its own sandbox's swarm ------------------------------------


async def test_a_memory_hog_swarm_cannot_take_the_supervisor_down(client: Client, settings: Settings) -> None:
    """Sixteen processes grow together past a small limit: at the moment the sandbox runs out,
    each is smaller than the supervisor, which the kernel would otherwise pick. It picks the
    hogs, the command says so, and the sandbox answers on."""
    sandbox_id = await create(client, memory_mb=64)
    swarm = "for i in $(seq 16); do tail /dev/zero & done; wait"
    with anyio.fail_after(120):
        result = await sh(client, sandbox_id, swarm, timeout_s=60)
    assert not result["timed_out"], result
    assert "the sandbox ran out of memory (its limit is 64 MiB)" in result["stderr"], result
    assert (await sh(client, sandbox_id, "echo ok"))["stdout"] == "ok\n"
    assert sandbox_row(settings, sandbox_id).status == SandboxStatus.RUNNING
    assert await survivors(client, sandbox_id, "tail /dev/zero") == []


async def test_a_command_killed_for_memory_says_so(client: Client) -> None:
    sandbox_id = await create(client, memory_mb=64)
    with anyio.fail_after(120):
        result = await sh(client, sandbox_id, "exec tail /dev/zero", timeout_s=60)
    assert result["exit_code"] == 137 and not result["timed_out"]
    assert "killed 1 process" in result["stderr"] and "exit code 137" in result["stderr"], result
    assert (await sh(client, sandbox_id, "echo ok"))["stdout"] == "ok\n"


async def test_a_detached_fork_bomb_dies_at_its_timeout_and_leaves_every_slot_free(
    client: Client, settings: Settings
) -> None:
    """Every generation double-forks into a session of its own with an empty environment, so
    the bomb is nowhere in its command's tree, session or environment; it still fills the
    pids limit, and still dies with its command, so the next command starts at once."""
    sandbox_id = await create(client)
    bomb = (
        "printf '%s\\n' '(setsid env -i /bin/bash /tmp/b.sh &)' '(setsid env -i /bin/bash /tmp/b.sh &)' 'sleep 30' > /tmp/b.sh;"
        " bash /tmp/b.sh; sleep 300"
    )
    started = time.monotonic()
    with anyio.fail_after(120):
        result = await sh(client, sandbox_id, bomb, timeout_s=8)
    assert result["timed_out"] is True and result["exit_code"] == 124
    assert time.monotonic() - started < 40
    assert (await sh(client, sandbox_id, "echo ok"))["stdout"] == "ok\n"
    assert await survivors(client, sandbox_id, "b.sh") == []
    assert sandbox_row(settings, sandbox_id).status == SandboxStatus.RUNNING


async def test_a_command_is_the_kernels_first_pick_for_memory_and_yields_the_cpu_to_the_supervisor(
    client: Client,
) -> None:
    """What a command starts is killed for memory before the supervisor and runs behind it."""
    sandbox_id = await create(client)
    probe = (
        "sleep 30 & echo $(cat /proc/self/oom_score_adj) $(ps -o ni= -p $!) "
        "$(cat /proc/$(pgrep -o -f supervisor.py)/oom_score_adj)"
    )
    command, child_nice, supervisor = (await sh(client, sandbox_id, probe, timeout_s=5))["stdout"].split()
    assert (int(command), int(child_nice)) == (1000, 10)
    assert int(supervisor) < int(command)
