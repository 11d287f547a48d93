"""Every tool of the server, fuzzed with random and adversarial arguments through the official client.

The arguments come from each tool's own input schema (as the client lists it), mixed with odd
values: control characters, escapes, paths out of /workspace, huge and negative numbers,
wrong types, missing and unknown fields, and ids that name live objects (a sandbox with odd
files in it, a team with a member and a task, a running dispatch, a snapshot, a token), objects
that are gone, objects of another kind, and nothing at all. Every failure must be a ToolError
with a message of its own (never an internal error), the server must keep answering, and when it
is over no container may be left but the pool's.

About 200 cases run with the suite; `bin/fuzz` runs more (DOCKYARD_FUZZ_EXAMPLES picks the count).
Computers are fuzzed without a browser: the fuzz's computer template names no image recipe, so a
valid computer_create is refused at once instead of building Chromium.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mcp import Client, MCPError

from dockyard.runtime.engine import instance_id
from dockyard.server.app import build_server
from tests.conftest import make_settings, remove_instance
from tests.tools.fuzzing import Ids, arguments

EXAMPLES = int(os.environ.get("DOCKYARD_FUZZ_EXAMPLES", "200"))
CALL_BUDGET_S = 120.0
RELEASE_WAIT_S = 30.0
# Files a tenant might leave in its sandbox for the file tools to trip over.
ODD_FILES = (
    "echo hello > hello.txt && mkdir -p dir/sub && echo deep > dir/sub/f && "
    "touch \"$(printf 'caf\\351')\" \"$(printf 'two\\nlines')\" && mkfifo fifo && "
    "python3 -c \"import socket; socket.socket(socket.AF_UNIX).bind('sock')\" && "
    "ln -s /etc link_out && ln -s hello.txt link_in && ln -s loop loop && ln -s ../.. up && ln -s . here"
)


GHOSTS = [
    "sbx_0000000000000000",
    "dsp_0000000000000000",
    "team_0000000000000000",
    "snp_0000000000000000",
    "tok_0000000000000000",
    "cmp_0000000000000000",
    "task_0000000000000000",
    "worker",
    "lead",
    "m1",
    "agent",
    "root",
]
_LIVE = ("sandbox", "snapshot", "token", "dispatch", "team", "task", "member", "role")
_GONE = 12


@dataclass
class World:
    """The server under fuzz and the live objects whose ids the cases use."""

    client: Client
    portal: BlockingPortal
    schemas: dict[str, dict[str, Any]] = field(default_factory=dict)
    live: dict[str, str] = field(default_factory=dict)
    dead: list[str] = field(default_factory=list)
    instance: str = ""
    store: Path | None = None
    history: deque[str] = field(default_factory=lambda: deque(maxlen=40))

    def ids(self) -> Ids:
        """The same number of ids for every case (hypothesis replays choices by position)."""
        fields = {
            "sandbox_id": "sandbox",
            "team_id": "team",
            "dispatch_id": "dispatch",
            "token_id": "token",
            "task_id": "task",
            "from_snapshot": "snapshot",
            "member": "role",
            "to": "role",
            "role": "role",
        }
        live = {name: self.live[key] for name, key in fields.items()}
        gone = (self.dead[-_GONE:] + GHOSTS)[:_GONE]
        return Ids(live, [self.live[key] for key in _LIVE] + gone + GHOSTS)

    async def call(self, tool: str, args: dict[str, Any]) -> tuple[bool, Any]:
        """(True, structured result) or (False, the error text)."""
        with anyio.fail_after(CALL_BUDGET_S):
            result = await self.client.call_tool(tool, args)
        said = result.content[0].text if result.is_error and result.content else result.structured_content
        self.history.append(f"{tool}({str(args)[:160]}) -> {'error' if result.is_error else 'ok'}: {str(said)[:160]}")
        if result.is_error:
            return False, result.content[0].text if result.content else ""
        return True, result.structured_content

    async def must(self, tool: str, **args: Any) -> dict[str, Any]:
        ok, answer = await self.call(tool, args)
        assert ok, f"{tool} failed while setting up: {answer}"
        return answer

    # -- the deep state ---------------------------------------------------------------

    async def sandbox(self) -> None:
        # A case may have just ended something that held a runtime (a cancelled dispatch, a team
        # shut down): its runtime is given back a moment later, so a full share is waited out.
        deadline = time.monotonic() + RELEASE_WAIT_S
        while not (made := await self.call("sandbox_create", {}))[0] and "quota" in made[1]:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"sandbox_create failed while setting up: {made[1]}\nthe live objects: {self.live}\n"
                    f"the sandboxes held, and the runs holding them:\n{self.holders()}\nthe last calls:\n"
                    + "\n".join(self.history)
                )
            await anyio.sleep(0.5)
        assert made[0], f"sandbox_create failed while setting up: {made[1]}"
        sandbox_id = made[1]["sandbox_id"]
        await self.must("sandbox_exec", sandbox_id=sandbox_id, command=ODD_FILES, timeout_s=30)
        self.live["sandbox"] = sandbox_id

    def holders(self) -> str:
        """Each running sandbox with the run that holds it (a dispatch or a member) and its state."""
        assert self.store is not None
        with closing(sqlite3.connect(self.store)) as db:
            rows = db.execute("SELECT id, run_id, created_at FROM sandbox WHERE status = 'running'").fetchall()
            found = []
            for sandbox_id, run_id, created in rows:
                run = db.execute("SELECT mode, status, error FROM dispatch WHERE id = ?", (run_id,)).fetchone()
                run = (
                    run or db.execute("SELECT 'member', status, team_id FROM member WHERE id = ?", (run_id,)).fetchone()
                )
                found.append(f"  {sandbox_id} created {created} by run {run_id}: {run}")
        return "\n".join(found)

    async def dispatch(self) -> None:
        started = await self.must(
            "dispatch", mode="remote", rationale="a target for the fuzz", task_summary="sleeps", prompt="sleep 100000"
        )
        self.live["dispatch"] = started["dispatch_id"]

    async def team(self) -> None:
        team_id = (await self.must("team_create", name="fuzzed"))["team_id"]
        added = await self.must("team_add_tasks", team_id=team_id, tasks=[{"title": "first"}, {"title": "second"}])
        member = await self.must("team_spawn", team_id=team_id, role="worker", prompt="echo working")
        self.live.update(team=team_id, task=added["tasks"][0]["task_id"], member=member["member_id"], role="worker")

    async def setup(self) -> None:
        tools = await self.client.list_tools()
        self.schemas = {tool.name: tool.input_schema for tool in tools.tools}
        await self.sandbox()
        self.live["snapshot"] = (await self.must("sandbox_snapshot", sandbox_id=self.live["sandbox"]))["snapshot_id"]
        gone = (await self.must("sandbox_create"))["sandbox_id"]
        await self.must("sandbox_destroy", sandbox_id=gone)
        self.dead.append(gone)
        self.live["token"] = (await self.must("token_mint", scopes=["sandbox:exec"]))["token_id"]
        await self.dispatch()
        await self.team()

    async def settle(self, tool: str, ok: bool, answer: Any) -> None:
        """Undo what a case created, and bring back the live objects a case ended."""
        if ok and isinstance(answer, dict):
            made = {
                "sandbox_create": ("sandbox_destroy", "sandbox_id"),
                "dispatch": ("cancel_dispatch", "dispatch_id"),
                "team_create": ("team_cleanup", "team_id"),
            }.get(tool)
            if made is not None and answer.get(made[1]) not in self.live.values():
                await self.call(made[0], {made[1]: answer[made[1]]})
                self.dead.append(answer[made[1]])
            if tool == "team_spawn":  # only into the live team: start that one afresh
                await self.call("team_shutdown", {"team_id": self.live["team"]})
        listed = await self.must("sandbox_list")
        if self.live["sandbox"] not in {s["sandbox_id"] for s in listed["sandboxes"]}:
            self.dead.append(self.live["sandbox"])
            await self.sandbox()
        ok, state = await self.call("await_dispatch", {"dispatch_id": self.live["dispatch"], "timeout_s": 0})
        if not ok or state["status"] not in ("queued", "running"):
            self.dead.append(self.live["dispatch"])
            await self.dispatch()
        ok, view = await self.call("team_tasks", {"team_id": self.live["team"]})
        if (
            not ok
            or view["team"]["status"] != "active"
            or {m["status"] for m in view["members"]} & {"stopped", "failed"}
        ):
            self.dead.append(self.live["team"])
            await self.call("team_cleanup", {"team_id": self.live["team"]})
            await self.team()
        await self.must("whoami")


def is_internal(tool: str, message: str) -> bool:
    """An error that says nothing of what was wrong: a crash hidden behind a ref or the SDK's
    bare 'Error executing tool X'."""
    bare = f"Error executing tool {tool}"
    return "internal error" in message or message.strip() == bare or message.startswith(f"{bare}: {bare}")


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, sandbox_image: str, docker_client: docker.DockerClient
) -> Iterator[World]:
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    fuzz_settings = make_settings(
        data_dir,
        sandbox={"exec_default_timeout_s": 5},
        pool={"claim_timeout_s": 5.0},
        templates={
            "default": {"pool": {"min": 2, "max": 8}},
            "computer": {"kind": "computer", "image": "no-browser-in-fuzz"},
        },
    )
    try:
        with start_blocking_portal() as portal:
            with portal.wrap_async_context_manager(Client(build_server(fuzz_settings))) as client:
                world = World(client, portal)
                world.instance = instance_id(fuzz_settings)
                world.store = fuzz_settings.store_path
                portal.call(world.setup)
                yield world
    finally:
        remove_instance(docker_client, fuzz_settings)


@settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_every_tool_answers_random_and_odd_arguments_with_a_clear_error(world: World, data: st.DataObject) -> None:
    """Each case is a few calls in a row, so one can meet the state another left."""
    for step in range(data.draw(st.integers(min_value=1, max_value=4), label="calls")):
        tool = data.draw(st.sampled_from(sorted(world.schemas)), label=f"tool {step}")
        args = data.draw(arguments(world.schemas[tool], world.ids()), label=f"arguments {step}")
        started = time.monotonic()
        try:
            ok, answer = world.portal.call(world.call, tool, args)
        except MCPError as exc:
            pytest.fail(f"{tool} answered a protocol error instead of a tool error: {exc}")
        event(f"{tool} {'answered' if ok else 'refused'}")
        if time.monotonic() - started > 5:
            event(f"slow: {tool} {'answered' if ok else 'refused'}")
        if not ok:
            assert answer.strip(), f"{tool} failed with an empty message"
            assert not is_internal(tool, answer), f"{tool} hit an internal error: {answer}"
        world.portal.call(world.settle, tool, ok, answer)


def test_after_the_fuzz_no_container_is_left_but_the_pool(world: World, docker_client: docker.DockerClient) -> None:
    """Runs after the fuzz (file order): give back every live object, then count containers."""
    world.portal.call(_give_everything_back, world)
    world.portal.call(_nothing_left_but_the_pool, world, docker_client, world.instance)


async def _give_everything_back(world: World) -> None:
    await world.call("cancel_dispatch", {"dispatch_id": world.live["dispatch"]})
    await world.call("team_cleanup", {"team_id": world.live["team"]})
    for sandbox in (await world.must("sandbox_list"))["sandboxes"]:
        await world.call("sandbox_destroy", {"sandbox_id": sandbox["sandbox_id"]})
    listed = await world.must("sandbox_list")
    assert listed["sandboxes"] == [], listed


async def _nothing_left_but_the_pool(world: World, docker_client: docker.DockerClient, instance: str) -> None:
    """Every labelled container is one of the pool's, and none is still claimed."""
    deadline = time.monotonic() + 90
    while True:
        pools = (await world.must("pool_status"))["pools"]
        held = sum(p["warm"] + p["provisioning"] + p["draining"] + p["claimed"] for p in pools)
        claimed = sum(p["claimed"] for p in pools)
        containers = docker_client.containers.list(
            all=True, sparse=True, filters={"label": f"dockyard.instance={instance}"}
        )
        if claimed == 0 and len(containers) <= held:
            return
        if time.monotonic() > deadline:
            pytest.fail(
                f"containers left after the fuzz: {len(containers)} for a pool holding {held} ({claimed} claimed)"
            )
        await anyio.sleep(1)
