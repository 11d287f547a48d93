"""Live output through the official client: each line as a progress notification while the
command runs, stderr in its place, heartbeats while a call is quiet, a dispatch's output while
it is awaited, and a flood that is coalesced instead of drowning the client."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from mcp import Client

from dockyard.runtime.substrate.settings import Settings
from dockyard.server.app import build_server
from tests.conftest import call, make_settings, remove_instance
from tests.scripted_llm import scripted_model, tool_call
from tests.served import Served, connect, mint

pytestmark = pytest.mark.anyio

HEARTBEAT_S = 1.0


@pytest.fixture
def settings(tmp_path: Path, sandbox_image: str) -> Settings:
    """A heartbeat every second, so a quiet call shows one in a short test."""
    return make_settings(tmp_path / "data", progress={"heartbeat_s": HEARTBEAT_S})


class Heard:
    """Every progress notification of one call, with when it arrived."""

    def __init__(self) -> None:
        self.notes: list[tuple[float, float, str]] = []

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.notes.append((time.monotonic(), progress, message or ""))

    @property
    def messages(self) -> list[str]:
        return [message for _, _, message in self.notes]

    @property
    def output(self) -> str:
        return "".join(m for m in self.messages if not m.startswith("[dockyard]"))

    def first(self, text: str) -> tuple[float, str]:
        """When the first notification holding `text` arrived, and what it held."""
        return next((at, message) for at, _, message in self.notes if text in message)

    def strictly_increasing(self) -> bool:
        progress = [p for _, p, _ in self.notes]
        return all(a < b for a, b in itertools.pairwise(progress))


async def run(client: Client, tool: str, **arguments: Any) -> tuple[dict[str, Any], Heard, float]:
    """Call a tool with a progress callback; its result, what was heard, and when it returned."""
    heard = Heard()
    result = await client.call_tool(tool, arguments, progress_callback=heard)
    assert not result.is_error, result.content
    assert result.structured_content is not None
    return result.structured_content, heard, time.monotonic()


async def test_a_line_reaches_the_client_while_the_command_still_sleeps(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    result, heard, returned = await run(
        client, "sandbox_exec", sandbox_id=sid, command="echo first; sleep 3; echo second"
    )
    assert result["stdout"] == "first\nsecond\n"
    first_at, first = heard.first("first")
    second_at, _ = heard.first("second")
    assert "second" not in first, "the first line must not wait for the second"
    assert first_at < second_at and returned - first_at > 2, (returned - first_at, heard.messages)
    assert heard.strictly_increasing()


async def test_stderr_lines_interleave_with_stdout_in_the_order_written(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    command = "echo out1; sleep 0.1; echo err1 >&2; sleep 0.1; echo out2; sleep 0.1; echo err2 >&2; echo err3 >&2"
    result, heard, _ = await run(client, "sandbox_exec", sandbox_id=sid, command=command)
    assert (result["stdout"], result["stderr"]) == ("out1\nout2\n", "err1\nerr2\nerr3\n")
    assert heard.output == "out1\n[stderr] err1\nout2\n[stderr] err2\n[stderr] err3\n"
    assert heard.strictly_increasing()


async def test_a_quiet_command_sends_heartbeats_naming_the_elapsed_time(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    result, heard, returned = await run(client, "sandbox_exec", sandbox_id=sid, command="echo warming up; sleep 3.5")
    assert result["exit_code"] == 0
    beats = [(at, m) for at, _, m in heard.notes if m.startswith("[dockyard] running for ")]
    assert len(beats) >= 2, heard.messages
    assert all(at < returned for at, _ in beats)
    assert any(re.match(r"\[dockyard\] running for [23] s", m) for _, m in beats), beats
    assert beats[-1][1].endswith("last output: warming up\n"), beats
    assert heard.strictly_increasing()


async def test_await_dispatch_streams_the_runs_lines_and_its_status(client: Client) -> None:
    script = "for i in 1 2 3; do echo line$i; sleep 1; done; echo oops >&2"
    sent = await call(client, "dispatch", mode="remote", rationale="a test", task_summary="lines", prompt=script)
    result, heard, returned = await run(client, "await_dispatch", dispatch_id=sent["dispatch_id"], timeout_s=120)
    assert result["status"] == "completed" and result["result"] == "line1\nline2\nline3\n"
    assert "line1\nline2\nline3\n[stderr] oops\n" in heard.output, heard.messages
    _, third = heard.first("line3")
    assert "line1" not in third, "later lines arrive as they are printed, not all at the end"
    assert returned - heard.first("line1")[0] > 1.5
    assert heard.messages[-1] == f"[dockyard] dispatch {sent['dispatch_id']} is completed"
    assert heard.strictly_increasing()


async def test_a_team_dispatch_streams_each_members_lines_under_its_name(client: Client) -> None:
    sent = await call(
        client,
        "dispatch",
        mode="team_multi_vm",
        rationale="a test",
        task_summary="two members",
        members=["echo alpha; sleep 0.5; echo beta", "sleep 0.2; echo gamma"],
    )
    result, heard, _ = await run(client, "await_dispatch", dispatch_id=sent["dispatch_id"], timeout_s=120)
    assert result["status"] == "completed"
    lines = heard.output.splitlines()
    assert {"[member 0] alpha", "[member 0] beta", "[member 1] gamma"} <= set(lines), heard.messages


async def test_a_flood_is_coalesced_and_the_result_is_still_whole(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    began = time.monotonic()
    result, heard, returned = await run(
        client, "sandbox_exec", sandbox_id=sid, command="yes | head -c 5M; echo done >&2"
    )
    assert result["exit_code"] == 0 and result["truncated"]
    assert result["stdout"].startswith("y\ny\ny\n") and result["stderr"] == "done\n"
    # At most one notification per 50 ms (20 a second), and a few at the edges.
    assert len(heard.notes) <= (returned - began) * 20 + 3, (len(heard.notes), returned - began)
    assert heard.output.startswith("y\ny\n") and heard.output.rstrip().endswith("[stderr] done")
    assert heard.strictly_increasing()


async def test_a_create_waiting_for_a_full_pool_sends_heartbeats_until_it_is_served(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    settings = make_settings(
        tmp_path / "data", default_pool={"min": 1, "max": 1}, progress={"heartbeat_s": HEARTBEAT_S}
    )
    try:
        async with Client(build_server(settings)) as client:
            held = (await call(client, "sandbox_create"))["sandbox_id"]
            outcome: dict[str, Any] = {}

            async def second() -> None:
                outcome["result"], outcome["heard"], _ = await run(client, "sandbox_create")

            async with anyio.create_task_group() as tg:
                tg.start_soon(second)
                await anyio.sleep(2.5)
                await call(client, "sandbox_destroy", sandbox_id=held)  # its runtime serves the waiting claim
    finally:
        remove_instance(docker_client, settings)
    assert outcome["result"]["sandbox_id"] != held
    beats = [m for m in outcome["heard"].messages if m.startswith("[dockyard] running for ")]
    assert beats and re.fullmatch(r"\[dockyard\] running for [12] s; no output yet", beats[0]), beats


async def test_await_dispatch_streams_what_an_llm_runner_says_and_the_commands_it_runs(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    with_text = tool_call("exec", command="echo from-the-tool; sleep 1.5")
    with_text["content"] = "Let me look."
    turns = [lambda _: with_text, lambda _: {"role": "assistant", "content": "all done"}]
    async with scripted_model(turns) as model:
        profile = {"kind": "llm", "url": model.url, "model": "scripted", "api_key": model.key}
        settings = make_settings(tmp_path / "data", runners={"script": {"kind": "script"}, "agent": profile})
        try:
            async with Client(build_server(settings)) as client:
                sent = await call(
                    client, "dispatch", mode="remote", rationale="r", task_summary="t", prompt="hi", runner="agent"
                )
                result, heard, returned = await run(
                    client, "await_dispatch", dispatch_id=sent["dispatch_id"], timeout_s=120
                )
        finally:
            remove_instance(docker_client, settings)
    assert result["status"] == "completed" and result["result"] == "all done"
    assert 'Let me look.\n-> exec {"command": "echo from-the-tool; sleep 1.5"}\nfrom-the-tool\nall done' in heard.output
    assert returned - heard.first("from-the-tool")[0] > 1, "the command's output arrives while it runs"


@pytest.fixture
async def two_workspaces(serve_http: Any) -> AsyncIterator[tuple[Served, str, str]]:
    served = serve_http()
    scopes = ["dispatch:create", "dispatch:read", "sandbox:create", "sandbox:exec"]
    a = (await mint(served, scopes=scopes, workspace_id="ws-a", user_id="ann"))["token"]
    b = (await mint(served, scopes=scopes, workspace_id="ws-b", user_id="bob"))["token"]
    yield served, a, b


async def test_workspace_b_cannot_hear_the_output_of_a_dispatch_of_workspace_a(
    two_workspaces: tuple[Served, str, str],
) -> None:
    served, a, b = two_workspaces
    async with connect(served, a) as ann, connect(served, b) as bob:
        sent = await call(
            ann, "dispatch", mode="remote", rationale="r", task_summary="secret", prompt="echo s3cret; sleep 2"
        )
        heard = Heard()
        refused = await bob.call_tool(
            "await_dispatch", {"dispatch_id": sent["dispatch_id"], "timeout_s": 10}, progress_callback=heard
        )
        assert refused.is_error and "unknown dispatch" in refused.content[0].text
        assert not any("s3cret" in m for m in heard.messages)
        result, mine, _ = await run(ann, "await_dispatch", dispatch_id=sent["dispatch_id"], timeout_s=60)
        assert result["result"] == "s3cret\n" and "s3cret" in mine.output
