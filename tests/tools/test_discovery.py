"""capabilities, dispatch_list, team_list and snapshot_list through the MCP client: what a
caller can use here, and what it started before, without remembering ids."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import docker
import pytest
from mcp import Client

from dockyard.runtime.substrate.settings import Settings
from dockyard.server.app import build_server
from tests.conftest import call, call_error, make_settings, remove_instance

pytestmark = pytest.mark.anyio

RUNNERS = {
    "script": {"kind": "script"},
    "coder": {"kind": "command", "argv": ["coder-cli", "--task", "{prompt}"]},
    "local-model": {"kind": "llm", "url": "http://127.0.0.1:9/v1", "model": "tiny", "api_key": "sk-never-shown"},
}


@pytest.fixture
def configured(tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient) -> Iterator[Settings]:
    settings = make_settings(tmp_path / "data", runners=RUNNERS)
    yield settings
    remove_instance(docker_client, settings)


@pytest.fixture
async def client(configured: Settings) -> AsyncIterator[Client]:
    async with Client(build_server(configured)) as connected:
        yield connected


async def dispatched(client: Client, summary: str, script: str = "echo done") -> str:
    sent = await call(client, "dispatch", mode="remote", rationale="a test", task_summary=summary, prompt=script)
    return sent["dispatch_id"]


async def test_capabilities_names_every_runner_mode_template_and_quota_with_the_callers_use(client: Client) -> None:
    before = await call(client, "capabilities")
    runners = {r["name"]: r for r in before["runners"]}
    assert {name: r["kind"] for name, r in runners.items()} == {
        "script": "script",
        "coder": "command",
        "local-model": "llm",
    }
    assert "bash script" in runners["script"]["prompt"]
    assert "coder-cli" in runners["coder"]["prompt"] and "{prompt}" in runners["coder"]["prompt"]
    assert "model 'tiny'" in runners["local-model"]["prompt"]
    assert "sk-never-shown" not in json.dumps(before) and "127.0.0.1:9" not in json.dumps(before)
    modes = {m["name"]: m for m in before["modes"]}
    assert set(modes) == {"remote", "local", "team_single_vm", "team_multi_vm", "user_pc"}
    assert "destroyed when it ends" in modes["remote"]["what"]
    assert "[member N]" in modes["team_multi_vm"]["what"] and "no model combines" in modes["team_multi_vm"]["what"]
    assert (modes["user_pc"]["enabled"], modes["remote"]["enabled"]) == (False, True)
    assert "enabled = false" in modes["user_pc"]["why_not"]
    templates = {t["name"]: t for t in before["templates"]}
    assert (templates["default"]["kind"], templates["default"]["is_default"]) == ("sandbox", True)
    assert (
        templates["default"]["pool_min"],
        templates["default"]["pool_max"],
        templates["default"]["workspace_share"],
    ) == (1, 8, 6)
    assert templates["computer"]["kind"] == "computer"
    assert before["bridge"]["command"] == "dockyard-bridge" and before["bridge"]["templates"] == ["default"]
    assert "none" in before["sandbox_limits"]["networks"]
    quotas = {q["name"]: q for q in before["quotas"]}
    assert quotas["workspace_sandboxes"]["used"] == 0 and quotas["tenant_sandboxes"]["used"] is None

    sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
    await call(client, "sandbox_snapshot", sandbox_id=sandbox_id)
    await dispatched(client, "counted")
    after = {q["name"]: q for q in (await call(client, "capabilities"))["quotas"]}
    assert after["workspace_sandboxes"]["used"] >= 1 and after["user_sandboxes"]["used"] >= 1
    assert after["dispatches_per_minute"]["used"] == 1 and after["dispatches_per_minute"]["limit"] == 120
    assert after["workspace_snapshot_mb"]["used"] >= 0


async def test_dispatch_list_pages_newest_first_and_filters_by_status(client: Client) -> None:
    done = [await dispatched(client, f"job {n}") for n in range(3)]
    for dispatch_id in done:
        assert (await call(client, "await_dispatch", dispatch_id=dispatch_id, timeout_s=120))["status"] == "completed"
    slow = await dispatched(client, "a slow one", "sleep 300")

    first = await call(client, "dispatch_list", limit=2)
    assert [row["dispatch_id"] for row in first["dispatches"]] == [slow, done[2]]
    assert first["next_cursor"]
    second = await call(client, "dispatch_list", limit=2, cursor=first["next_cursor"])
    assert [row["dispatch_id"] for row in second["dispatches"]] == [done[1], done[0]]
    assert second["next_cursor"] is None
    row = second["dispatches"][1]
    assert (row["status"], row["mode"], row["runner"], row["task_summary"]) == (
        "completed",
        "remote",
        "script",
        "job 0",
    )

    live = await call(client, "dispatch_list", status=["queued", "running"])
    assert [row["dispatch_id"] for row in live["dispatches"]] == [slow]
    finished = await call(client, "dispatch_list", status=["completed"], limit=100)
    assert {row["dispatch_id"] for row in finished["dispatches"]} == set(done)
    await call(client, "cancel_dispatch", dispatch_id=slow)
    assert (await call(client, "dispatch_list", status=["cancelled"]))["dispatches"][0]["dispatch_id"] == slow


async def test_team_list_counts_members_and_open_tasks_and_filters_by_status(client: Client) -> None:
    old = (await call(client, "team_create", name="old"))["team_id"]
    new = (await call(client, "team_create", name="new"))["team_id"]
    await call(client, "team_add_tasks", team_id=new, tasks=[{"title": "a"}, {"title": "b"}])
    await call(client, "team_shutdown", team_id=old)
    listed = await call(client, "team_list")
    assert [(t["team_id"], t["status"], t["open_tasks"], t["members"]) for t in listed["teams"]] == [
        (new, "active", 2, 0),
        (old, "shut down", 0, 0),
    ]
    assert [t["team_id"] for t in (await call(client, "team_list", status=["active"]))["teams"]] == [new]
    page = await call(client, "team_list", limit=1)
    assert [t["team_id"] for t in page["teams"]] == [new]
    rest = await call(client, "team_list", limit=1, cursor=page["next_cursor"])
    assert ([t["team_id"] for t in rest["teams"]], rest["next_cursor"]) == ([old], None)


async def test_snapshot_list_shows_snapshots_of_sandboxes_gone_and_filters_by_sandbox(client: Client) -> None:
    one = (await call(client, "sandbox_create"))["sandbox_id"]
    two = (await call(client, "sandbox_create"))["sandbox_id"]
    first = (await call(client, "sandbox_snapshot", sandbox_id=one, label="first"))["snapshot_id"]
    second = (await call(client, "sandbox_snapshot", sandbox_id=two, label="second"))["snapshot_id"]
    await call(client, "sandbox_destroy", sandbox_id=one)
    listed = await call(client, "snapshot_list")
    assert [(s["snapshot_id"], s["label"]) for s in listed["snapshots"]] == [(second, "second"), (first, "first")]
    assert [s["snapshot_id"] for s in (await call(client, "snapshot_list", sandbox_id=one))["snapshots"]] == [first]


async def test_bad_limits_statuses_and_cursors_are_refused_with_what_is_allowed(client: Client) -> None:
    await dispatched(client, "one")
    await dispatched(client, "two")
    for tool in ("dispatch_list", "team_list", "snapshot_list"):
        for limit in (0, 101, -5):
            assert "limit" in await call_error(client, tool, limit=limit), (tool, limit)
        assert "not one" in await call_error(client, tool, cursor="made-up"), tool
    assert "status" in await call_error(client, "dispatch_list", status=["finished"])
    cursor = (await call(client, "dispatch_list", limit=1))["next_cursor"]
    body, _, seal = cursor.partition(".")
    for forged in (cursor[:-2], body + "." + seal[::-1], body[::-1] + "." + seal, cursor + "x", "." + seal, body + "."):
        message = await call_error(client, "dispatch_list", limit=1, cursor=forged)
        assert "dispatch_list gave you" in message, forged
    # A cursor of one list is no good to another.
    assert "team_list gave you" in await call_error(client, "team_list", cursor=cursor)
    assert len((await call(client, "dispatch_list", limit=1, cursor=cursor))["dispatches"]) == 1


async def test_the_new_tools_have_titles_and_the_corrected_descriptions(client: Client) -> None:
    tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    for name in ("capabilities", "dispatch_list", "team_list", "snapshot_list"):
        assert tools[name].title and tools[name].annotations is not None, name
        assert tools[name].annotations.title == tools[name].title and tools[name].annotations.read_only_hint, name
    dispatch = json.dumps(tools["dispatch"].input_schema)
    assert "only one for now" not in dispatch and "capabilities" in dispatch
    assert "'llm' runner the task for the model" in dispatch and "destroyed when the dispatch ends" in dispatch
    assert "synthesized" not in dispatch
    assert "[member N]" in (tools["dispatch"].description or "")
    assert "dockyard-bridge" in (tools["sandbox_create"].description or "")
