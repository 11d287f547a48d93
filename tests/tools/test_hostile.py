"""Hostile input through the MCP client: path escapes, floods, runaway commands and bombs.

Each test plays a caller (or a command) that tries to break out of /workspace, to outlive its
timeout, or to take the sandbox or the server down, and checks that dockyard holds.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from mcp import Client

from dockyard.runtime.substrate.settings import Settings
from dockyard.server.app import build_server
from tests.conftest import call, call_error, container_of, make_settings, remove_instance, sandbox_row, sh

pytestmark = pytest.mark.anyio

OUTPUT_CAP = 65536
ESCAPES = ["../etc/passwd", "/etc/passwd", "a/../../x"]


async def create(client: Client, **arguments: Any) -> str:
    return (await call(client, "sandbox_create", **arguments))["sandbox_id"]


async def process_lines(client: Client, sandbox_id: str) -> list[str]:
    """`ps` output of the sandbox, minus the ps pipeline itself."""
    result = await sh(client, sandbox_id, "ps -eo pid,args --no-headers")
    return [line for line in result["stdout"].splitlines() if "ps -eo" not in line]


# -- paths that leave /workspace -------------------------------------------------------


@pytest.mark.parametrize("path", ESCAPES)
async def test_file_tools_refuse_paths_that_leave_workspace(client: Client, path: str) -> None:
    sandbox_id = await create(client)
    tools = (("sandbox_write_file", {"content": "pwned"}), ("sandbox_read_file", {}), ("sandbox_list_files", {}))
    for tool, extra in tools:
        message = await call_error(client, tool, sandbox_id=sandbox_id, path=path, **extra)
        assert "/workspace" in message, (tool, message)
    assert (await sh(client, sandbox_id, "grep -c pwned /etc/passwd; test ! -e /x"))["stdout"].strip() == "0"


async def test_absolute_write_elsewhere_creates_nothing_there(client: Client) -> None:
    sandbox_id = await create(client)
    message = await call_error(client, "sandbox_write_file", sandbox_id=sandbox_id, path="/tmp/x", content="pwned")
    assert "outside /workspace" in message
    assert (await sh(client, sandbox_id, "ls -A /tmp"))["stdout"].strip() == ""
    assert (await sh(client, sandbox_id, "ls -A /workspace"))["stdout"].strip() == ""


async def test_symlinks_out_of_workspace_are_refused_for_read_and_write(client: Client) -> None:
    sandbox_id = await create(client)
    await sh(client, sandbox_id, "ln -s /etc /workspace/etc && ln -s /tmp /workspace/t && ln -s /etc/passwd pw")
    for path in ("etc/passwd", "pw"):
        message = await call_error(client, "sandbox_read_file", sandbox_id=sandbox_id, path=path)
        assert "outside /workspace" in message
    for path in ("t/pwned", "t/deeper/pwned"):
        message = await call_error(client, "sandbox_write_file", sandbox_id=sandbox_id, path=path, content="pwned")
        assert "outside /workspace" in message
    message = await call_error(client, "sandbox_list_files", sandbox_id=sandbox_id, path="etc")
    assert "outside /workspace" in message
    leftovers = await sh(client, sandbox_id, "ls -A /tmp; grep -c pwned /etc/passwd")
    assert leftovers["stdout"].split() == ["0"]


async def test_symlink_that_stays_inside_workspace_reads_fine(client: Client) -> None:
    sandbox_id = await create(client)
    await call(client, "sandbox_write_file", sandbox_id=sandbox_id, path="data.txt", content="inside\n")
    await sh(client, sandbox_id, "ln -s data.txt link.txt")
    content = await call(client, "sandbox_read_file", sandbox_id=sandbox_id, path="link.txt")
    assert content["content"] == "inside\n"
    assert content["path"] == "data.txt"


# -- content the write tool must refuse ------------------------------------------------


async def test_write_over_the_cap_is_refused_with_the_cap_named(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    small = make_settings(tmp_path / "small-cap", sandbox={"write_cap_bytes": 4096})
    try:
        async with Client(build_server(small)) as client:
            sandbox_id = await create(client)
            message = await call_error(
                client, "sandbox_write_file", sandbox_id=sandbox_id, path="big.txt", content="x" * 5000
            )
            assert "4096" in message and "cap" in message
            blob = base64.b64encode(b"\0" * 4097).decode()
            message = await call_error(
                client, "sandbox_write_file", sandbox_id=sandbox_id, path="big.bin", content=blob, encoding="base64"
            )
            assert "4096" in message
            assert (await sh(client, sandbox_id, "ls -A"))["stdout"] == ""
            written = await call(client, "sandbox_write_file", sandbox_id=sandbox_id, path="ok.txt", content="x" * 4096)
            assert written["size"] == 4096
    finally:
        remove_instance(docker_client, small)


async def test_bad_base64_is_refused_and_writes_nothing(client: Client) -> None:
    sandbox_id = await create(client)
    for bad in ("not base64!!", "YWJj=ZGVm", "QUJD\x00"):
        message = await call_error(
            client, "sandbox_write_file", sandbox_id=sandbox_id, path="f.bin", content=bad, encoding="base64"
        )
        assert "base64" in message
    assert (await sh(client, sandbox_id, "ls -A"))["stdout"] == ""


# -- commands that outlive their timeout -----------------------------------------------


async def test_exec_past_timeout_kills_background_children_and_reports_timed_out(client: Client) -> None:
    sandbox_id = await create(client)
    started = time.monotonic()
    result = await sh(client, sandbox_id, "sleep 300 & sleep 300", timeout_s=2)
    assert time.monotonic() - started < 30
    assert result["timed_out"] is True
    assert result["exit_code"] == 124
    assert not [line for line in await process_lines(client, sandbox_id) if "sleep 300" in line]


async def test_timed_out_background_loop_stops_writing(client: Client) -> None:
    """A loop the command left in the background (own session, even) is killed too."""
    sandbox_id = await create(client)
    loop = (
        "(while true; do echo x >> /workspace/marker; sleep 0.2; done) & setsid sleep 300 & "
        "env -i setsid sleep 301 & sleep 300"  # the last child drops the command's environment too
    )
    started = time.monotonic()
    result = await sh(client, sandbox_id, loop, timeout_s=2)
    assert time.monotonic() - started < 30
    assert result["timed_out"] is True and result["exit_code"] == 124
    first = await sh(client, sandbox_id, "stat -c %s marker")
    assert int(first["stdout"]) > 0
    await anyio.sleep(1.0)
    second = await sh(client, sandbox_id, "stat -c %s marker")
    assert second["stdout"] == first["stdout"]
    leftovers = await process_lines(client, sandbox_id)
    assert not [line for line in leftovers if "sleep" in line and "infinity" not in line], leftovers


# -- output floods ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "stream", "starts"),
    [
        ("yes | head -c 5000000", "stdout", "y\ny\n"),
        ("seq 1 2000000", "stdout", "1\n2\n3\n"),
        ("seq 1 2000000 >&2", "stderr", "1\n2\n3\n"),
    ],
)
async def test_output_flood_is_capped_with_a_visible_marker(
    client: Client, command: str, stream: str, starts: str
) -> None:
    sandbox_id = await create(client)
    started = time.monotonic()
    result = await sh(client, sandbox_id, command, timeout_s=60)
    assert time.monotonic() - started < 60
    assert result["exit_code"] == 0 and not result["timed_out"]
    assert result["truncated"] is True
    text = result[stream]
    assert text.startswith(starts) and " bytes omitted (all of it: " in text
    assert len(text) < 16000  # the result budget; the rest is the linked resource
    read = await client.read_resource(result[f"{stream}_uri"])
    whole = read.contents[0].text  # type: ignore[union-attr] - a text resource
    assert whole.startswith(starts) and f"over the {OUTPUT_CAP}-byte output cap" in whole
    assert whole[-100:] in text  # the result ends as the whole output does
    assert len(whole.encode()) < OUTPUT_CAP + 200
    other = result["stderr" if stream == "stdout" else "stdout"]
    assert other == ""


# -- bombs -----------------------------------------------------------------------------


@pytest.mark.parametrize("bomb", ["f(){ f & f; }; f", "while true; do sleep 30 & done"])
async def test_fork_bomb_is_held_and_killed_while_the_server_keeps_answering(client: Client, bomb: str) -> None:
    """A bomb that stays in the foreground runs into the pids limit, then dies at its timeout."""
    bombed, bystander = await create(client), await create(client)
    answers: dict[str, Any] = {}

    async def run_bomb() -> None:
        answers["bomb"] = await sh(client, bombed, bomb, timeout_s=5)
        answers["bomb_done"] = time.monotonic()

    async def meanwhile() -> None:
        await anyio.sleep(1.5)
        answers["echo"] = await sh(client, bystander, "echo ok")
        answers["list"] = await call(client, "sandbox_list")
        answers["others_done"] = time.monotonic()

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_bomb)
            tg.start_soon(meanwhile)
    assert answers["echo"]["stdout"] == "ok\n"
    assert {s["sandbox_id"] for s in answers["list"]["sandboxes"]} == {bombed, bystander}
    assert answers["others_done"] < answers["bomb_done"], "the server did not answer while the bomb ran"
    assert answers["bomb"]["timed_out"] is True and answers["bomb"]["exit_code"] == 124
    assert "Resource temporarily unavailable" in answers["bomb"]["stderr"], "the bomb never reached the pids limit"
    assert (await sh(client, bombed, "echo alive"))["stdout"] == "alive\n"
    leftovers = await process_lines(client, bombed)
    assert len(leftovers) <= 5, leftovers


async def test_detached_fork_bomb_is_contained_and_its_sandbox_can_be_ended(client: Client) -> None:
    """The classic bomb backgrounds itself, so the call returns at once and the bomb fills the
    sandbox's pids limit. It stays inside: the server and other sandboxes keep working, and
    the bombed sandbox can be destroyed at once, its runtime never handed over dirty."""
    bombed = await create(client)
    bystander = await create(client)
    with anyio.fail_after(60):
        result = await sh(client, bombed, ":(){ :|:& };:", timeout_s=5)
    assert result["exit_code"] in (0, 124)
    with anyio.fail_after(60):
        for _ in range(5):
            assert (await sh(client, bystander, "echo fine"))["stdout"] == "fine\n"
            assert (await call(client, "pool_status"))["pools"]
            await anyio.sleep(0.5)
    # Commands in the bombed sandbox either run or say why they cannot start.
    probe = await client.call_tool("sandbox_exec", {"sandbox_id": bombed, "command": "echo maybe", "timeout_s": 10})
    assert not probe.is_error or "could not start the command" in probe.content[0].text
    with anyio.fail_after(60):
        await call(client, "sandbox_destroy", sandbox_id=bombed)
    fresh = await create(client)
    assert (await sh(client, fresh, "ps -eo args --no-headers | grep -c '[:]()' || true"))["stdout"].strip() == "0"


@pytest.mark.parametrize(
    "command",
    [
        'python3 -c "b = bytearray(4 * 1024**3)"',
        'python3 -c "l = []\nwhile True: l.append(bytearray(8 * 1024**2))"',
    ],
)
async def test_memory_bomb_fails_alone_and_the_sandbox_survives(
    client: Client, docker_client: docker.DockerClient, settings: Settings, command: str
) -> None:
    sandbox_id = await create(client, memory_mb=256)
    answers: dict[str, Any] = {}

    async def bomb() -> None:
        answers["bomb"] = await sh(client, sandbox_id, command, timeout_s=60)

    async def meanwhile() -> None:
        await anyio.sleep(0.3)
        answers["list"] = await call(client, "sandbox_list")

    with anyio.fail_after(120):
        async with anyio.create_task_group() as tg:
            tg.start_soon(bomb)
            tg.start_soon(meanwhile)
    result = answers["bomb"]
    assert not result["timed_out"]
    assert result["exit_code"] == 137 or (result["exit_code"] != 0 and "MemoryError" in result["stderr"]), result
    assert [s["sandbox_id"] for s in answers["list"]["sandboxes"]] == [sandbox_id]
    assert container_of(docker_client, settings, sandbox_id)["State"]["Status"] == "running"
    assert (await sh(client, sandbox_id, "echo alive"))["stdout"] == "alive\n"


# -- ids that do not name a live sandbox -----------------------------------------------


async def test_unknown_sandbox_id_is_refused_by_every_tool(client: Client) -> None:
    ghost = "sbx_0000000000000000"
    for tool, extra in (
        ("sandbox_exec", {"command": "echo hi"}),
        ("sandbox_read_file", {"path": "a.txt"}),
        ("sandbox_write_file", {"path": "a.txt", "content": "x"}),
        ("sandbox_list_files", {}),
        ("sandbox_destroy", {}),
    ):
        message = await call_error(client, tool, sandbox_id=ghost, **extra)
        assert "unknown sandbox" in message and ghost in message, (tool, message)


async def test_destroyed_sandbox_id_answers_unknown_sandbox(client: Client, settings: Settings) -> None:
    sandbox_id = await create(client)
    await call(client, "sandbox_destroy", sandbox_id=sandbox_id)
    tools = (("sandbox_exec", {"command": "echo hi"}), ("sandbox_read_file", {"path": "a"}), ("sandbox_destroy", {}))
    for tool, extra in tools:
        message = await call_error(client, tool, sandbox_id=sandbox_id, **extra)
        assert "unknown sandbox" in message, (tool, message)
    assert sandbox_row(settings, sandbox_id).status == "destroyed"


# -- special files ---------------------------------------------------------------------


async def test_reading_a_named_pipe_fails_fast_instead_of_hanging(client: Client) -> None:
    """A FIFO nobody writes to would block a naive open() forever, and the tool call with it."""
    sandbox_id = await create(client)
    await sh(client, sandbox_id, "mkfifo pipe")
    with anyio.move_on_after(30) as waited:
        message = await call_error(client, "sandbox_read_file", sandbox_id=sandbox_id, path="pipe")
    assert not waited.cancelled_caught, "sandbox_read_file on a named pipe was still hanging after 30 s"
    assert "not a regular file" in message
    assert not [line for line in await process_lines(client, sandbox_id) if "dockyard-helper" in line]
