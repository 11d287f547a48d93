"""A tenant who controls everything inside its sandbox against the file tools.

A process in the sandbox swaps a directory and a symlink out of /workspace back and forth
(atomically, as fast as it can) while the test calls the file tools through the official
client many times: nothing outside /workspace may ever be read, listed or written. Files with
odd names and special files are listed and refused with a clear message, never an internal
error, and a FIFO never hangs a call.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from mcp import Client

from tests.conftest import call, call_error, sh

pytestmark = pytest.mark.anyio

CALLS = 150  # per test; each hit of the race in the old code was a leak
BUDGET_S = 90.0

# Exchanges `d` (a real directory) and `l` (a symlink to the target) with renameat2(EXCHANGE),
# so `d` is always there, one moment a directory inside /workspace, the next a way out.
SWAPPER = r"""
import ctypes, os, sys, time
libc = ctypes.CDLL(None, use_errno=True)
os.symlink(sys.argv[1], "l")
with open("swapper.pid", "w") as fh:
    fh.write(str(os.getpid()))
end = time.monotonic() + 150
while time.monotonic() < end:
    for _ in range(1000):
        libc.renameat2(-100, b"d", -100, b"l", 2)
"""


async def start_swapper(client: Client, sandbox_id: str, target: str) -> None:
    """A directory `d` with decoys named like the files outside, and a process swapping it."""
    setup = (
        "mkdir -p d/etc && for f in passwd status hostname etc/passwd; do echo inside > d/$f; done && "
        f"nohup python3 swapper.py {target} > /dev/null 2>&1 & "
        "for i in $(seq 100); do test -e swapper.pid && break; sleep 0.05; done"
    )
    await call(client, "sandbox_write_file", sandbox_id=sandbox_id, path="swapper.py", content=SWAPPER)
    await sh(client, sandbox_id, setup)


async def stop_swapper(client: Client, sandbox_id: str) -> None:
    await sh(client, sandbox_id, "kill $(cat swapper.pid); sleep 0.2; if test -L d; then rm d && mv l d; else rm l; fi")


async def hammer(client: Client, tool: str, arguments: dict[str, Any]) -> list[Any]:
    """Call a tool up to CALLS times (within BUDGET_S); every answer, success or refusal."""
    answers: list[Any] = []
    deadline = time.monotonic() + BUDGET_S
    while len(answers) < CALLS and time.monotonic() < deadline:
        result = await client.call_tool(tool, arguments)
        if result.is_error:
            message = result.content[0].text
            assert "internal error" not in message, message
            answers.append(message)
        else:
            answers.append(result.structured_content)
    return answers


async def create(client: Client) -> str:
    return (await call(client, "sandbox_create"))["sandbox_id"]


@pytest.mark.parametrize(
    ("target", "path"),
    [("/etc", "d/passwd"), ("/proc/self", "d/status"), ("/", "d/etc/passwd")],
)
async def test_a_tenant_swapping_a_directory_for_a_symlink_never_reads_a_file_outside_workspace(
    client: Client, target: str, path: str
) -> None:
    sandbox_id = await create(client)
    await start_swapper(client, sandbox_id, target)
    answers = await hammer(client, "sandbox_read_file", {"sandbox_id": sandbox_id, "path": path})
    await stop_swapper(client, sandbox_id)
    read = [answer for answer in answers if isinstance(answer, dict)]
    leaked = [answer["content"][:60] for answer in read if answer["content"] != "inside\n"]
    assert not leaked, f"read outside /workspace through {target}: {leaked[:3]}"
    assert read, f"no read succeeded in {len(answers)} calls: {answers[:3]}"
    refusals = {message for message in answers if isinstance(message, str)}
    odd = [message for message in refusals if "outside /workspace" not in message and "changed while" not in message]
    assert not odd, f"refusals other than a path outside /workspace: {odd[:3]}"


async def test_a_tenant_swapping_a_directory_for_a_symlink_never_lists_a_directory_outside_workspace(
    client: Client,
) -> None:
    sandbox_id = await create(client)
    await start_swapper(client, sandbox_id, "/etc")
    answers = await hammer(client, "sandbox_list_files", {"sandbox_id": sandbox_id, "path": "d", "recursive": True})
    await stop_swapper(client, sandbox_id)
    inside = {"d/etc", "d/passwd", "d/status", "d/hostname", "d/etc/passwd"}
    listed = [answer for answer in answers if isinstance(answer, dict)]
    leaked = {entry["path"] for answer in listed for entry in answer["entries"]} - inside
    assert not leaked, f"listed /etc through the swapped directory: {sorted(leaked)[:5]}"
    assert listed, f"no listing succeeded in {len(answers)} calls: {answers[:3]}"
    refusals = {message for message in answers if isinstance(message, str)}
    odd = [message for message in refusals if "outside /workspace" not in message and "changed while" not in message]
    assert not odd, f"refusals that name what is outside: {odd[:3]}"


@pytest.mark.parametrize("target", ["/tmp", "/home/agent"])
async def test_a_tenant_swapping_a_directory_for_a_symlink_never_gets_a_file_written_outside_workspace(
    client: Client, target: str
) -> None:
    sandbox_id = await create(client)
    before = (await sh(client, sandbox_id, f"ls -A {target}"))["stdout"]
    await start_swapper(client, sandbox_id, target)
    answers = await hammer(
        client, "sandbox_write_file", {"sandbox_id": sandbox_id, "path": "d/pwned", "content": "pwned"}
    )
    await stop_swapper(client, sandbox_id)
    after = (await sh(client, sandbox_id, f"ls -A {target}"))["stdout"]
    assert after == before, f"written into {target} through the swapped directory: {after!r}"
    assert (await sh(client, sandbox_id, "cat d/pwned"))["stdout"] == "pwned"
    assert any(isinstance(answer, dict) for answer in answers), answers[:3]


# -- odd names and special files -------------------------------------------------------


async def test_files_with_names_that_are_not_utf8_or_hold_newlines_are_listed_escaped_and_refused_by_name(
    client: Client,
) -> None:
    sandbox_id = await create(client)
    await sh(
        client,
        sandbox_id,
        "touch \"$(printf 'caf\\351')\" \"$(printf 'two\\nlines')\" plain && mkdir \"$(printf 'd\\377')\" && touch \"$(printf 'd\\377')/inner\"",
    )
    listing = await call(client, "sandbox_list_files", sandbox_id=sandbox_id, recursive=True)
    seen = {entry["path"]: entry["is_addressable"] for entry in listing["entries"]}
    assert seen == {"caf\\xe9": False, "two\\x0alines": False, "plain": True, "d\\xff": False, "d\\xff/inner": False}
    message = await call_error(client, "sandbox_read_file", sandbox_id=sandbox_id, path="two\nlines")
    assert "control character" in message and "two\\x0alines" in message
    message = await call_error(client, "sandbox_write_file", sandbox_id=sandbox_id, path="bell\x07", content="x")
    assert "control character" in message
    assert "does not exist" in await call_error(client, "sandbox_read_file", sandbox_id=sandbox_id, path="caf\\xe9")


async def test_special_files_are_listed_with_their_type_and_refused_by_read_and_write(client: Client) -> None:
    sandbox_id = await create(client)
    make = "mkfifo pipe && python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('sock')\""
    await sh(client, sandbox_id, make)
    listing = await call(client, "sandbox_list_files", sandbox_id=sandbox_id)
    assert {(entry["path"], entry["type"]) for entry in listing["entries"]} == {("pipe", "fifo"), ("sock", "socket")}
    with anyio.fail_after(30):
        for path, what in (("pipe", "FIFO"), ("sock", "socket")):
            message = await call_error(client, "sandbox_read_file", sandbox_id=sandbox_id, path=path)
            assert what in message and "regular files only" in message, message
            message = await call_error(client, "sandbox_write_file", sandbox_id=sandbox_id, path=path, content="x")
            assert what in message, message
    still = await sh(client, sandbox_id, "test -p pipe && test -S sock && echo kept")
    assert still["stdout"] == "kept\n"
