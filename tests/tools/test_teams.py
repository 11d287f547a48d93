"""Agent teams through the MCP client: members on real sandboxes, script and llm runners (the
model is a scripted endpoint on loopback), messages with receipts, claims, plans, shutdown."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from mcp import Client
from sqlmodel import Session, create_engine, select

from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import AuditEvent, Member, Message, Team, TeamTask, Token
from dockyard.server.app import build_server
from tests.conftest import call, call_error, make_settings, remove_instance
from tests.scripted_llm import Turn, scripted_model, tool_call

pytestmark = pytest.mark.anyio


def rows(settings: Settings, model: type, *where: Any) -> list:
    with Session(create_engine(f"sqlite:///{settings.store_path}")) as session:
        return list(session.exec(select(model).where(*where)).all())


def by_role(scripts: dict[str, list[Turn]]) -> list[Turn]:
    """One scripted model for a whole team: each request goes to the script of the member
    whose system prompt it carries, turn after turn."""
    seen: dict[str, int] = defaultdict(int)

    def turn(messages: list[dict]) -> dict:
        role = re.search(r"You are '([^']+)'", messages[0]["content"])[1]
        step = seen[role]
        seen[role] += 1
        script = scripts[role]
        return script[min(step, len(script) - 1)](messages)

    return [turn]


def say(text: str) -> Turn:
    return lambda _: {"role": "assistant", "content": text}


@asynccontextmanager
async def team_server(
    tmp_path: Path, docker_client: docker.DockerClient, **overrides: Any
) -> AsyncIterator[tuple[Client, Settings]]:
    settings = make_settings(tmp_path / "data", **overrides)
    try:
        async with Client(build_server(settings)) as client:
            yield client, settings
    finally:
        remove_instance(docker_client, settings)


async def until(client: Client, team_id: str, done: Callable[[dict], bool], timeout_s: float = 120) -> dict:
    """team_tasks, polled until `done` holds for it."""
    with anyio.fail_after(timeout_s):
        while True:
            view = await call(client, "team_tasks", team_id=team_id)
            if done(view):
                return view
            await anyio.sleep(0.2)


def members(view: dict) -> dict[str, dict]:
    return {m["role"]: m for m in view["members"]}


def all_idle(turns: int) -> Callable[[dict], bool]:
    return lambda view: (
        bool(view["members"]) and all(m["status"] == "idle" and m["turns"] >= turns for m in view["members"])
    )


async def test_three_llm_members_message_each_other_directly_and_see_receipts(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    def receipt(messages: list[dict]) -> dict:
        sent = json.loads(messages[-1]["content"])["sent"]
        return {"role": "assistant", "content": f"delivered={[m['delivered'] for m in sent]}"}

    scripts = {
        "researcher": [
            lambda _: tool_call("team_message", to="implementer", body="Use a hash map; lookups must be O(1)."),
            say("told the implementer"),
            lambda _: tool_call("team_read"),  # woken by the reply: is my message delivered?
            receipt,
        ],
        "implementer": [
            say("waiting for the researcher"),
            lambda m: tool_call(
                "write_file", path="impl.txt", content="hash map, because: " + m[-1]["content"].split("\n", 1)[1]
            ),
            lambda _: tool_call("team_message", to="researcher", body="Done: impl.txt uses a hash map."),
            say("implemented"),
        ],
        "reviewer": [say("nothing to review yet")],
    }
    async with scripted_model(by_role(scripts)) as model:
        profile = {"kind": "llm", "url": model.url, "model": "scripted", "api_key": model.key}
        async with team_server(tmp_path, docker_client, runners={"script": {"kind": "script"}, "agent": profile}) as (
            client,
            settings,
        ):
            team = (await call(client, "team_create", name="builders"))["team_id"]
            for role in ("implementer", "reviewer", "researcher"):
                await call(client, "team_spawn", team_id=team, role=role, prompt=f"You are the {role}.", runner="agent")
            view = await until(
                client,
                team,
                lambda v: (
                    members(v).get("researcher", {}).get("turns") == 2
                    and all(m["status"] == "idle" for m in v["members"])
                ),
            )
            by = members(view)
            assert by["researcher"]["last_output"] == "delivered=[True]"
            assert (by["implementer"]["turns"], by["implementer"]["last_output"]) == (2, "implemented")
            assert by["reviewer"]["turns"] == 1  # nobody wrote to it: it was never woken
            impl = await call(client, "sandbox_read_file", sandbox_id=by["implementer"]["sandbox_id"], path="impl.txt")
            assert impl["content"] == "hash map, because: Use a hash map; lookups must be O(1)."
        # The message reached the implementer as a user turn, with its author.
        implementer_turn2 = next(
            r
            for r in model.requests
            if "You are 'implementer'" in r["messages"][0]["content"]
            and len([m for m in r["messages"] if m["role"] == "user"]) == 2
        )
        woken = [m for m in implementer_turn2["messages"] if m["role"] == "user"][-1]["content"]
        assert woken.startswith("[message from researcher") and "hash map" in woken
        notes = rows(settings, Message)
        assert [(n.kind, n.body[:9], n.delivered_at is not None) for n in notes] == [
            ("message", "Use a has", True),
            ("message", "Done: imp", True),
        ]
        ids = {m.role: m.id for m in rows(settings, Member)}
        assert (notes[0].sender, notes[0].recipient, notes[1].sender) == (
            ids["researcher"],
            ids["implementer"],
            ids["implementer"],
        )
        # Each message is in the audit under its author's own token.
        sent = [a for a in rows(settings, AuditEvent) if a.kind == "team.message"]
        tokens = {t.run_id: t.id for t in rows(settings, Token)}
        assert [(a.run_id, a.token_id) for a in sent] == [
            (ids["researcher"], tokens[ids["researcher"]]),
            (ids["implementer"], tokens[ids["implementer"]]),
        ]


async def test_a_broadcast_wakes_every_member_with_the_message_on_stdin_and_in_its_inbox_file(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    script = 'echo "turn $DOCKYARD_TURN as $DOCKYARD_ROLE"; cat; echo "inbox lines: $(wc -l < "$DOCKYARD_INBOX")"'
    async with team_server(tmp_path, docker_client, default_pool={"min": 0, "max": 8}) as (client, _settings):
        team = (await call(client, "team_create", name="crew"))["team_id"]
        for role in ("one", "two", "three"):
            await call(client, "team_spawn", team_id=team, role=role, prompt=script)
        await until(client, team, all_idle(1))
        sent = await call(client, "team_broadcast", team_id=team, body="stand-up in five")
        assert sorted(m["recipient"] for m in sent["messages"]) == ["one", "three", "two"]
        view = await until(client, team, all_idle(2))
        for role, member in members(view).items():
            first, line, count = member["last_output"].splitlines()
            assert first == f"turn 2 as {role}" and count == "inbox lines: 1"
            assert {k: json.loads(line)[k] for k in ("from", "kind", "body")} == {
                "from": "lead",
                "kind": "broadcast",
                "body": "stand-up in five",
            }
        assert all(m["delivered"] for m in (await call(client, "team_read", team_id=team))["sent"])


async def test_plan_mode_reject_then_approve(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    scripts = {
        "planner": [
            lambda _: tool_call("exec", command="touch acted-too-early"),
            lambda _: tool_call("team_propose_plan", plan="v1: just do it"),
            say("proposed v1"),
            lambda m: tool_call(
                "team_propose_plan", plan="v2: write tests first, then the code"
            ),  # after the rejection
            say("proposed v2"),
            lambda _: tool_call("exec", command="echo planned > done.txt && cat done.txt"),  # after the approval
            say("done"),
        ]
    }
    async with scripted_model(by_role(scripts)) as model:
        profile = {"kind": "llm", "url": model.url, "model": "scripted", "api_key": model.key}
        async with team_server(tmp_path, docker_client, runners={"script": {"kind": "script"}, "agent": profile}) as (
            client,
            _settings,
        ):
            team = (await call(client, "team_create", name="careful"))["team_id"]
            await call(
                client, "team_spawn", team_id=team, role="planner", prompt="Build it.", runner="agent", plan_mode=True
            )
            assert "no plan waiting" in await call_error(
                client, "team_approve_plan", team_id=team, member="planner", approve=True
            )
            view = await until(
                client, team, lambda v: members(v)["planner"]["plan_status"] == "pending" and all_idle(1)(v)
            )
            assert members(view)["planner"]["plan"] == "v1: just do it"
            # Its first command was refused: plan mode.
            assert "plan mode" in model.requests[1]["messages"][-1]["content"]
            inbox = await call(client, "team_read", team_id=team)
            assert [(m["kind"], m["sender"], m["body"]) for m in inbox["received"]] == [
                ("plan", "planner", "v1: just do it")
            ]

            rejected = await call(
                client, "team_approve_plan", team_id=team, member="planner", approve=False, feedback="tests first"
            )
            assert rejected["plan_status"] == "rejected"
            view = await until(
                client, team, lambda v: members(v)["planner"]["plan_status"] == "pending" and all_idle(2)(v)
            )
            assert members(view)["planner"]["plan"].startswith("v2")
            rejection = [m for m in model.requests[3]["messages"] if m["role"] == "user"][-1]["content"]
            assert "rejected" in rejection and "tests first" in rejection

            await call(client, "team_approve_plan", team_id=team, member="planner", approve=True)
            view = await until(client, team, all_idle(3))
            planner = members(view)["planner"]
            assert (planner["plan_status"], planner["last_output"]) == ("approved", "done")
            files = await call(client, "sandbox_list_files", sandbox_id=planner["sandbox_id"])
            names = {f["path"] for f in files["entries"]}
            assert "done.txt" in names and "acted-too-early" not in names


async def test_single_vm_members_share_files_and_multi_vm_members_do_not(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    script = '[ "$DOCKYARD_TURN" = 1 ] && echo x > "from-$DOCKYARD_ROLE"; ls /workspace | grep from- | tr "\\n" " "'
    async with team_server(tmp_path, docker_client, default_pool={"min": 0, "max": 8}) as (client, _settings):
        team = (await call(client, "team_create", name="mixed"))["team_id"]
        for role, isolation in (("s1", "shared"), ("s2", "shared"), ("o1", "own"), ("o2", "own")):
            await call(client, "team_spawn", team_id=team, role=role, prompt=script, isolation=isolation)
        await until(client, team, all_idle(1))
        await call(client, "team_broadcast", team_id=team, body="look around")
        view = await until(client, team, all_idle(2))
        by = members(view)
        assert by["s1"]["sandbox_id"] == by["s2"]["sandbox_id"] == view["team"]["sandbox_id"]
        assert len({by["s1"]["sandbox_id"], by["o1"]["sandbox_id"], by["o2"]["sandbox_id"]}) == 3
        assert by["s1"]["last_output"].split() == by["s2"]["last_output"].split() == ["from-s1", "from-s2"]
        assert (by["o1"]["last_output"].split(), by["o2"]["last_output"].split()) == (["from-o1"], ["from-o2"])


async def test_shutdown_frees_every_runtime_and_cleanup_forgets_the_team(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    async with team_server(tmp_path, docker_client, default_pool={"min": 0, "max": 8}) as (client, settings):
        team = (await call(client, "team_create", name="short-lived"))["team_id"]
        await call(client, "team_spawn", team_id=team, role="a", prompt="sleep 300", isolation="shared")
        await call(client, "team_spawn", team_id=team, role="b", prompt="echo hi", isolation="shared")
        await call(client, "team_spawn", team_id=team, role="c", prompt="sleep 300")
        await until(client, team, lambda v: [m["status"] for m in v["members"]].count("busy") == 2)
        await call(client, "team_message", team_id=team, to="b", body="note for the inbox")
        (pool,) = [p for p in (await call(client, "pool_status"))["pools"] if p["template"] == "default"]
        assert pool["claimed"] == 2  # the shared sandbox and c's own

        stopped = await call(client, "team_shutdown", team_id=team)
        assert {m["status"] for m in stopped["members"]} == {"stopped"} and stopped["team"]["status"] == "shut down"
        (pool,) = [p for p in (await call(client, "pool_status"))["pools"] if p["template"] == "default"]
        assert pool["claimed"] == 0
        assert (await call(client, "sandbox_list"))["sandboxes"] == []
        assert all(t.revoked_at is not None for t in rows(settings, Token) if t.run_id and t.run_id.startswith("mem_"))
        assert "shut down" in await call_error(client, "team_message", team_id=team, to="b", body="too late")

        gone = await call(client, "team_cleanup", team_id=team)
        assert (gone["members"], gone["messages"]) == (3, 1)
        assert (
            rows(settings, Team) == rows(settings, Member) == rows(settings, Message) == rows(settings, TeamTask) == []
        )
        assert "unknown team" in await call_error(client, "team_tasks", team_id=team)
        # No runtime keeps an inbox file: the team's sandboxes were wiped on their way back.
        for container in docker_client.containers.list(
            filters={"label": f"dockyard.instance={(settings.data_dir / 'instance-id').read_text().strip()}"}
        ):
            assert container.exec_run(["test", "-e", "/workspace/.dockyard"]).exit_code != 0


async def test_bad_team_requests_are_refused_clearly_and_audited(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    async with team_server(
        tmp_path, docker_client, default_pool={"min": 0, "max": 4}, teams={"message_max_bytes": 1000}
    ) as (client, settings):
        assert "unknown team" in await call_error(client, "team_tasks", team_id="team_nope")
        team = (await call(client, "team_create", name="strict"))["team_id"]
        await call(client, "team_spawn", team_id=team, role="worker", prompt="true")
        assert "already has a member" in await call_error(
            client, "team_spawn", team_id=team, role="worker", prompt="true"
        )
        assert "unknown runner" in await call_error(
            client, "team_spawn", team_id=team, role="w2", prompt="true", runner="nope"
        )
        assert "unknown member 'ghost'" in await call_error(client, "team_message", team_id=team, to="ghost", body="hi")
        assert "cap is 1000 bytes" in await call_error(
            client, "team_message", team_id=team, to="worker", body="x" * 1001
        )
        assert "no plan waiting" in await call_error(
            client, "team_approve_plan", team_id=team, member="worker", approve=True
        )
        assert "members claim tasks" in await call_error(client, "team_claim", team_id=team)
        added = await call(client, "team_add_tasks", team_id=team, tasks=[{"title": "only task"}])
        assert added["tasks"][0]["status"] == "open"
    errors = [a for a in rows(settings, AuditEvent) if a.kind.startswith("team.") and a.outcome in ("error", "denied")]
    assert len(errors) >= 7


# Programs in a member's sandbox reach the team tools through dockyard-bridge with the member's
# own token (DOCKYARD_TOKEN), using the SDK the image ships.
IN_SANDBOX = """/opt/dockyard/client/bin/python - <<'PY'
import json, os
import anyio
from mcp import Client, StdioServerParameters
TEAM = os.environ["DOCKYARD_TEAM_ID"]

async def attempt(client, tool, **arguments):
    result = await client.call_tool(tool, arguments)
    return {{"error": result.content[0].text}} if result.is_error else result.structured_content

async def main():
    bridge = StdioServerParameters(command="dockyard-bridge", env={{"DOCKYARD_TOKEN": os.environ["DOCKYARD_TOKEN"]}})
    async with Client(bridge) as client:
{body}

anyio.run(main)
PY
"""


def in_sandbox(body: str) -> str:
    return IN_SANDBOX.format(body="\n".join("        " + line for line in body.strip().splitlines()))


CLAIMER = in_sandbox("""
outcomes = []
async def claim():
    outcomes.append(await attempt(client, "team_claim", team_id=TEAM))
async with anyio.create_task_group() as tg:
    for _ in range(40):
        tg.start_soon(claim)
print(json.dumps({"won": [o["task_id"] for o in outcomes if "task_id" in o],
                  "refused": [o["error"] for o in outcomes if "error" in o]}))
""")


async def test_two_hundred_concurrent_claims_on_fifty_tasks_by_five_members_give_each_task_one_owner(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    async with team_server(tmp_path, docker_client, default_pool={"min": 0, "max": 8}) as (client, settings):
        team = (await call(client, "team_create", name="claimers"))["team_id"]
        await call(client, "team_add_tasks", team_id=team, tasks=[{"title": f"task {n}"} for n in range(50)])
        for n in range(5):
            await call(client, "team_spawn", team_id=team, role=f"m{n}", prompt=CLAIMER)
        view = await until(client, team, all_idle(1), timeout_s=240)
        won: list[str] = []
        refused: list[str] = []
        assert all(member["last_error"] is None for member in view["members"]), view["members"]
        # each member's whole output: team_tasks shows it cut to fit the result budget
        for member in rows(settings, Member):
            result = json.loads(member.last_output)
            won += result["won"]
            refused += result["refused"]
        assert len(won) == len(set(won)) == 50 and len(refused) == 150, refused[:3]
        assert all("is claimed by" in reason or "no open task" in reason for reason in refused)
        owners = {t["task_id"]: t["owner"] for t in view["tasks"]}
        assert set(owners) == set(won) and set(owners.values()) <= {f"m{n}" for n in range(5)}
        assert all(t["status"] == "claimed" for t in view["tasks"])
    claims = [a for a in rows(settings, AuditEvent) if a.kind == "team.claim"]
    assert len(claims) == 200 and sum(a.outcome == "ok" for a in claims) == 50
    ids = {m.id for m in rows(settings, Member)}
    assert {a.run_id for a in claims} == ids  # every claim is attributed to the member that made it


MEMBER_PROBE = in_sandbox("""
out = {"whoami": await attempt(client, "whoami")}
out["spawn"] = await attempt(client, "team_spawn", team_id=TEAM, role="intruder", prompt="true")
out["message"] = await attempt(client, "team_message", team_id=TEAM, to="lead", body="from the member")
task = (await attempt(client, "team_claim", team_id=TEAM))["task_id"]
out["done"] = await attempt(client, "team_complete", team_id=TEAM, task_id=task, result="42")
out["again"] = await attempt(client, "team_claim", team_id=TEAM, task_id=task)
out["twice"] = await attempt(client, "team_complete", team_id=TEAM, task_id=task, result="43")
helper = "dockyard-call team_message '" + json.dumps({"team_id": TEAM, "to": "lead", "body": "from a helper"}) + "'; echo exit=$?"
sent = await attempt(client, "dispatch", mode="remote", rationale="a helper", task_summary="help", prompt=helper)
out["helper"] = await attempt(client, "await_dispatch", dispatch_id=sent["dispatch_id"], timeout_s=120)
print(json.dumps(out))
""")


async def test_a_member_acts_as_itself_cannot_lead_and_its_helpers_get_no_team_tools(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    async with team_server(tmp_path, docker_client, default_pool={"min": 0, "max": 8}) as (client, settings):
        team = (await call(client, "team_create", name="layers"))["team_id"]
        await call(client, "team_add_tasks", team_id=team, tasks=[{"title": "the answer", "detail": "compute it"}])
        spawned = await call(client, "team_spawn", team_id=team, role="worker", prompt=MEMBER_PROBE)
        view = await until(client, team, all_idle(1), timeout_s=180)
        worker = members(view)["worker"]
        assert worker["last_error"] is None, worker["last_error"]
        out = json.loads(worker["last_output"])
        assert out["whoami"]["run_id"] == spawned["member_id"] and "team:member" in out["whoami"]["scopes"]
        assert "team:lead" in out["spawn"]["error"]
        assert out["message"]["messages"][0]["sender"] == "worker"
        assert (out["done"]["status"], out["done"]["owner"], out["done"]["result"]) == ("done", "worker", "42")
        assert "is done by 'worker'" in out["again"]["error"] and "not claimed by you" in out["twice"]["error"]
        assert [(t["status"], t["result"]) for t in view["tasks"]] == [("done", "42")]
        assert out["helper"]["status"] == "completed" and "exit=1" in out["helper"]["result"]
        inbox = await call(client, "team_read", team_id=team)
        assert [m["body"] for m in inbox["received"]] == ["from the member"]  # nothing from the helper
    denied = [
        a for a in rows(settings, AuditEvent) if a.outcome == "denied" and a.kind in ("team.spawn", "team.message")
    ]
    assert {a.kind for a in denied} == {"team.spawn", "team.message"}
