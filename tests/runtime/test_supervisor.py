"""The in-sandbox supervisor: how commands stream, end and are killed, what a sandbox's own
programs can (not) do to it, who may speak on its control channel, and what happens when it
dies."""

from __future__ import annotations

import base64
import hashlib
import os

import anyio
import docker
import pytest

from dockyard.runtime.engine import Engine
from dockyard.runtime.runtimes.supervisor import Link, connect_unix
from dockyard.runtime.substrate.errors import InvalidRequestError, SandboxLostError, SupervisorError
from dockyard.runtime.substrate.store import Runtime, RuntimeState, Sandbox
from tests.runtime.pooltools import event_reasons, wait_for_pool

pytestmark = pytest.mark.anyio


async def test_output_streams_in_order_while_the_command_runs(engine: Engine) -> None:
    who = engine.operator
    sandbox = await engine.sandboxes.create(who)
    seen: list[tuple[str, str]] = []

    async def on_output(stream: str, text: str) -> None:
        seen.append((stream, text))

    command = "for i in 1 2 3 4; do echo out$i; echo err$i >&2; sleep 0.3; done"
    result = await engine.sandboxes.exec(who, sandbox.sandbox_id, command, on_output=on_output)
    stdout = [text for stream, text in seen if stream == "stdout"]
    stderr = [text for stream, text in seen if stream == "stderr"]
    assert "".join(stdout) == result.stdout == "out1\nout2\nout3\nout4\n"
    assert "".join(stderr) == result.stderr == "err1\nerr2\nerr3\nerr4\n"
    # Delivered while running: the first line came in an earlier chunk than the last.
    first = next(i for i, text in enumerate(stdout) if "out1" in text)
    last = next(i for i, text in enumerate(stdout) if "out4" in text)
    assert first < last, stdout


async def test_exit_codes_are_the_commands_own(engine: Engine) -> None:
    who = engine.operator
    sandbox = await engine.sandboxes.create(who)
    cases = {"true": 0, "exit 7": 7, "no-such-command-here": 127, "kill -9 $$": 137, "kill -TERM $$": 143}
    for command, code in cases.items():
        assert (await engine.sandboxes.exec(who, sandbox.sandbox_id, command)).exit_code == code, command
    with pytest.raises(InvalidRequestError, match="cannot enter /workspace/not-there"):
        await engine.sandboxes.exec(who, sandbox.sandbox_id, "pwd", cwd="not-there")
    # A working directory is entered with the sandbox user's rights, also through a symlink.
    await engine.sandboxes.exec(who, sandbox.sandbox_id, "ln -s /run/dockyard-sup hidden && mkdir -p sub")
    with pytest.raises(InvalidRequestError, match="Permission denied"):
        await engine.sandboxes.exec(who, sandbox.sandbox_id, "ls control", cwd="hidden")
    assert (await engine.sandboxes.exec(who, sandbox.sandbox_id, "pwd", cwd="sub")).stdout == "/workspace/sub\n"


async def test_a_cancelled_command_is_killed_with_its_children(engine: Engine) -> None:
    who = engine.operator
    sandbox = await engine.sandboxes.create(who)
    with anyio.move_on_after(1.5) as waited:
        await engine.sandboxes.exec(who, sandbox.sandbox_id, "sleep 601 & setsid sleep 602 & sleep 603")
    assert waited.cancelled_caught
    with anyio.fail_after(20):
        while True:
            left = (await engine.sandboxes.exec(who, sandbox.sandbox_id, "ps -eo args=")).stdout
            if "sleep 60" not in left:
                break
            await anyio.sleep(0.2)


async def test_output_past_the_cap_keeps_its_head_and_tail_and_counts_the_middle(engine: Engine) -> None:
    who = engine.operator
    sandbox = await engine.sandboxes.create(who)
    cap = engine.settings.sandbox.output_cap_bytes
    total = 50_000_000
    result = await engine.sandboxes.exec(
        who, sandbox.sandbox_id, f"head -c {total} /dev/zero | tr '\\0' a; echo; echo done; echo done >&2"
    )
    assert result.exit_code == 0 and result.truncated and result.stderr == "done\n"
    head, marker, tail = result.stdout.split("\n", 2)
    assert head == "a" * (cap // 2) and tail.endswith("a\ndone\n") and len(tail) == cap // 2
    assert marker == f"... {total + 6 - cap} bytes omitted (over the {cap}-byte output cap) ..."


async def test_binary_files_round_trip_byte_for_byte(engine: Engine) -> None:
    who = engine.operator
    sandbox = await engine.sandboxes.create(who)
    data = bytes(range(256)) * 64 + os.urandom(256 * 1024)
    await engine.sandboxes.write_file(who, sandbox.sandbox_id, "bin/blob", base64.b64encode(data).decode(), "base64")
    digest = (await engine.sandboxes.exec(who, sandbox.sandbox_id, "sha256sum bin/blob")).stdout.split()[0]
    assert digest == hashlib.sha256(data).hexdigest()
    back = await engine.sandboxes.read_file(who, sandbox.sandbox_id, "bin/blob", "base64", None)
    assert base64.b64decode(back.content) == data and back.size == len(data) and not back.truncated


async def test_commands_cannot_signal_read_or_reach_the_supervisor(engine: Engine) -> None:
    who = engine.operator
    sandbox = await engine.sandboxes.create(who)
    link = await engine.supervisors.link((await engine.store.get(Sandbox, sandbox.sandbox_id)).container_id)
    pid = link.supervisor_pid
    probe = (
        f"kill -9 {pid}; echo kill=$?; kill -9 1; echo init=$?; "
        f"cat /proc/{pid}/environ > /dev/null; echo environ=$?; "
        "ls /run/dockyard-sup; echo list=$?; "
        "python3 -c \"import socket; socket.socket(socket.AF_UNIX).connect('/run/dockyard-sup/control/control.sock')\" "
        "2> /dev/null; echo connect=$?"
    )
    seen = await engine.sandboxes.exec(who, sandbox.sandbox_id, probe)
    for attempt in ("kill", "init", "environ", "list", "connect"):
        assert f"{attempt}=0" not in seen.stdout, seen.stdout
    assert "Operation not permitted" in seen.stderr and "Permission denied" in seen.stderr, seen.stderr
    again = await engine.sandboxes.exec(who, sandbox.sandbox_id, "echo alive")
    assert again.stdout == "alive\n"
    assert (await engine.supervisors.link(link.container_id)).supervisor_pid == pid


async def test_the_control_channel_refuses_a_peer_without_the_key(engine: Engine) -> None:
    who = engine.operator
    sandbox = await engine.sandboxes.create(who)
    row = await engine.store.get(Sandbox, sandbox.sandbox_id)
    socket_path = engine.supervisors.directory(row.runtime_id) / "control.sock"
    stream = await connect_unix(socket_path)
    intruder = Link(stream, row.runtime_id, row.container_id)
    with pytest.raises(SupervisorError, match="refused"):
        await intruder.handshake(b"not-the-key")
    await stream.aclose()
    assert (await engine.sandboxes.exec(who, sandbox.sandbox_id, "echo still-served")).stdout == "still-served\n"


async def test_a_dead_supervisor_loses_a_claimed_sandbox_and_evicts_a_warm_runtime(
    engine: Engine, docker_client: docker.DockerClient
) -> None:
    who = engine.operator
    sandbox = await engine.sandboxes.create(who)
    row = await engine.store.get(Sandbox, sandbox.sandbox_id)
    link = await engine.supervisors.link(row.container_id)
    docker_client.containers.get(row.container_id).exec_run(["kill", "-9", str(link.supervisor_pid)], user="root")
    with anyio.fail_after(30):
        while (await engine.store.get(Sandbox, sandbox.sandbox_id)).status != "lost":
            await anyio.sleep(0.2)
    with pytest.raises(SandboxLostError, match="lost"):
        await engine.sandboxes.exec(who, sandbox.sandbox_id, "true")

    pool = engine.pools.pool_of("default")
    await wait_for_pool(engine, warm=1)
    warm_id = next(iter(pool.warm))
    warm = await engine.store.get(Runtime, warm_id)
    warm_link = await engine.supervisors.link(warm.container_id)
    docker_client.containers.get(warm.container_id).exec_run(["kill", "-9", str(warm_link.supervisor_pid)], user="root")
    with anyio.fail_after(30):
        while (await engine.store.get(Runtime, warm_id)).state != RuntimeState.DESTROYED:
            await anyio.sleep(0.2)
    assert any(reason.startswith("unhealthy") for reason in await event_reasons(engine, warm_id))
    await wait_for_pool(engine, warm=1)
