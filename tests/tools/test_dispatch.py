"""dispatch / await_dispatch / cancel_dispatch with the script runner, through the MCP client."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from pathlib import Path

import anyio
import docker
import pytest
from mcp import Client, types
from sqlmodel import Session, create_engine, select

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import AuditEvent, Dispatch, DispatchDecision
from dockyard.server.app import build_server
from tests.conftest import call, call_error, make_settings, remove_instance
from tests.scripted_llm import scripted_model, tool_call

pytestmark = pytest.mark.anyio


async def send(client: Client, script: str, mode: str = "remote", **extra: object) -> dict:
    return await call(
        client,
        "dispatch",
        mode=mode,
        rationale="a test",
        task_summary=extra.pop("summary", "run a script"),
        prompt=script,
        **extra,
    )


def rows(settings: Settings, model: type) -> list:
    with Session(create_engine(f"sqlite:///{settings.store_path}")) as session:
        return list(session.exec(select(model)).all())


async def test_remote_runs_in_a_fresh_sandbox_and_local_in_the_callers(client: Client, settings: Settings) -> None:
    mine = (await call(client, "sandbox_create"))["sandbox_id"]
    await call(client, "sandbox_write_file", sandbox_id=mine, path="secret.txt", content="only here")
    remote = await send(client, "ls -A /workspace; echo remote-done")
    assert remote["status"] in ("queued", "running") and "await_dispatch" in remote["next_steps"]
    local = await send(client, "cat secret.txt", mode="local", sandbox_id=mine)
    done = await call(client, "await_dispatch", dispatch_id=remote["dispatch_id"], timeout_s=120)
    assert (done["status"], done["result"]) == ("completed", "remote-done\n")  # nothing of the caller's
    assert done["sandbox_id"] != mine
    here = await call(client, "await_dispatch", dispatch_id=local["dispatch_id"], timeout_s=120)
    assert (here["status"], here["result"], here["sandbox_id"]) == ("completed", "only here", mine)
    # The remote sandbox went back to the pool; the caller's own is untouched.
    assert [s["sandbox_id"] for s in (await call(client, "sandbox_list"))["sandboxes"]] == [mine]
    decisions = rows(settings, DispatchDecision)
    assert {(d.requested_mode, d.used_mode, d.outcome) for d in decisions} == {
        ("remote", "remote", "accepted"),
        ("local", "local", "accepted"),
    }
    assert all(d.rationale == "a test" and "default" in d.pool for d in decisions)


async def test_a_hint_in_the_task_overrides_the_mode(client: Client, settings: Settings) -> None:
    mine = (await call(client, "sandbox_create"))["sandbox_id"]
    sent = await send(client, "echo hi", mode="local", sandbox_id=mine, summary="check it in a clean environment")
    assert sent["mode"] == "remote" and sent["requested_mode"] == "local"
    assert "clean environment" in sent["hint"]
    done = await call(client, "await_dispatch", dispatch_id=sent["dispatch_id"], timeout_s=120)
    assert done["status"] == "completed" and done["sandbox_id"] != mine
    decision = rows(settings, DispatchDecision)[-1]
    assert (decision.requested_mode, decision.used_mode) == ("local", "remote") and "clean environment" in decision.hint


async def test_bad_dispatches_are_refused_clearly_and_recorded(client: Client, settings: Settings) -> None:
    assert "sandbox_id" in await call_error(
        client, "dispatch", mode="local", rationale="r", task_summary="t", prompt="true"
    )
    assert "runner" in await call_error(
        client, "dispatch", mode="remote", rationale="r", task_summary="t", prompt="true", runner="magic"
    )
    assert "needs members" in await call_error(
        client, "dispatch", mode="team_multi_vm", rationale="r", task_summary="t", prompt="true"
    )
    assert "user_pc" in await call_error(
        client, "dispatch", mode="user_pc", rationale="r", task_summary="t", prompt="true"
    )
    assert "needs a prompt" in await call_error(client, "dispatch", mode="remote", rationale="r", task_summary="t")
    assert "unknown sandbox" in await call_error(
        client, "dispatch", mode="local", rationale="r", task_summary="t", prompt="true", sandbox_id="sbx_nope"
    )
    assert "unknown dispatch" in await call_error(client, "await_dispatch", dispatch_id="dsp_nope")
    assert "unknown dispatch" in await call_error(client, "cancel_dispatch", dispatch_id="dsp_nope")
    refused = rows(settings, DispatchDecision)
    assert len(refused) == 6 and all(d.outcome == "refused" and d.reason for d in refused)
    assert rows(settings, Dispatch) == []


async def test_a_failing_script_fails_with_its_reason_and_waiting_again_continues(client: Client) -> None:
    failed = await send(client, "echo partial; echo broke >&2; exit 3")
    done = await call(client, "await_dispatch", dispatch_id=failed["dispatch_id"], timeout_s=120)
    assert done["status"] == "failed" and "exited with code 3" in done["error"] and "broke" in done["error"]
    slow = await send(client, "sleep 2; echo finally")
    early = await call(client, "await_dispatch", dispatch_id=slow["dispatch_id"], timeout_s=0.3)
    assert early["status"] in ("queued", "running") and early["result"] is None
    late = await call(client, "await_dispatch", dispatch_id=slow["dispatch_id"], timeout_s=120)
    assert (late["status"], late["result"]) == ("completed", "finally\n")


async def test_cancel_stops_the_runner_and_frees_its_sandbox(client: Client, settings: Settings) -> None:
    sent = await send(client, "sleep 300")
    with anyio.fail_after(60):
        while (await call(client, "await_dispatch", dispatch_id=sent["dispatch_id"], timeout_s=0.2))[
            "sandbox_id"
        ] is None:
            pass
    stopped = await call(client, "cancel_dispatch", dispatch_id=sent["dispatch_id"])
    assert stopped["status"] == "cancelled"
    assert (await call(client, "await_dispatch", dispatch_id=sent["dispatch_id"]))["status"] == "cancelled"
    sandbox = stopped["sandbox_id"]
    assert "unknown sandbox" in await call_error(client, "sandbox_exec", sandbox_id=sandbox, command="true")


async def test_fifty_dispatches_at_once_on_a_pool_of_four_all_complete_once(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    # One workspace runs at most its share of the pool at once (3 of 4), so the last of fifty
    # queued claims waits for the forty-seven before it: the claim timeout allows for that.
    settings = make_settings(tmp_path / "data", default_pool={"min": 2, "max": 4}, pool={"claim_timeout_s": 240.0})
    try:
        async with Client(build_server(settings)) as client:
            sent = [await send(client, f"echo job-{i}") for i in range(50)]
            with anyio.fail_after(300):
                results = [
                    await call(client, "await_dispatch", dispatch_id=s["dispatch_id"], timeout_s=300) for s in sent
                ]
        assert [r["status"] for r in results] == ["completed"] * 50
        assert [r["result"] for r in results] == [f"job-{i}\n" for i in range(50)]
        execs = [e for e in rows(settings, AuditEvent) if e.kind == "sandbox.exec" and e.outcome == "started"]
        assert sorted(e.run_id for e in execs) == sorted(s["dispatch_id"] for s in sent)  # each ran exactly once
    finally:
        remove_instance(docker_client, settings)


async def test_a_stop_mid_dispatch_leaves_it_interrupted_and_frees_its_sandbox(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    settings = make_settings(tmp_path / "data")
    try:
        async with Engine.open(settings) as engine:
            who = engine.operator
            sent = await engine.dispatches.dispatch(
                who, mode="remote", rationale="r", task_summary="t", prompt="sleep 300"
            )
            with anyio.fail_after(60):
                while (await engine.dispatches.wait(who, sent.dispatch_id, 0.2)).sandbox_id is None:
                    pass
        async with Engine.open(settings) as engine:
            after = await engine.dispatches.wait(engine.operator, sent.dispatch_id, 1)
            assert after.status == "interrupted" and "not re-run" in after.error
            with anyio.fail_after(60):
                while await engine.sandboxes.list(engine.operator.model_copy(update={"run_id": None})):
                    await anyio.sleep(0.2)
            execs = [e for e in await engine.audit.query(kind="sandbox.exec") if e.outcome == "started"]
            assert len(execs) == 1  # never re-run
    finally:
        remove_instance(docker_client, settings)


async def test_a_runner_gets_its_attribution_and_a_run_token_revoked_when_it_ends(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    settings = make_settings(
        tmp_path / "data",
        runners={"script": {"kind": "script"}, "echoer": {"kind": "command", "argv": ["printf", "[%s]", "{prompt}"]}},
    )
    try:
        async with Engine.open(settings) as engine:
            who = engine.operator
            tricky = 'x\'; echo pwned $(id -un) `id`; "quoted" $HOME'
            sent = await engine.dispatches.dispatch(
                who, mode="remote", rationale="r", task_summary="t", prompt=tricky, runner="echoer"
            )
            done = await engine.dispatches.wait(who, sent.dispatch_id, 120)
            assert (done.status, done.result) == ("completed", f"[{tricky}]")  # one argument, no shell
            script = 'echo "$DOCKYARD_WORKSPACE_ID $DOCKYARD_RUN_ID"; echo "$DOCKYARD_TOKEN"'
            sent = await engine.dispatches.dispatch(who, mode="remote", rationale="r", task_summary="t", prompt=script)
            done = await engine.dispatches.wait(who, sent.dispatch_id, 120)
            attribution, token = done.result.split("\n")[:2]
            assert attribution == f"local {sent.dispatch_id}" and token.startswith("dyt_")
            with pytest.raises(Exception, match="revoked"):
                await engine.tokens.verify(token)  # the run is over
            assert "unknown runner 'nope'" in str(
                await _refusal(
                    engine.dispatches.dispatch(
                        who, mode="remote", rationale="r", task_summary="t", prompt="x", runner="nope"
                    )
                )
            )
    finally:
        remove_instance(docker_client, settings)


async def _refusal(pending: Awaitable[object]) -> Exception:
    try:
        await pending
    except Exception as exc:  # noqa: BLE001 - the refusal is what the test reads
        return exc
    raise AssertionError("expected a refusal")


async def test_the_dispatch_resource_wakes_subscribers_and_await_reports_progress(client: Client) -> None:
    sent = await send(client, "sleep 1.5; echo via-resource")
    uri = f"dockyard://dispatches/{sent['dispatch_id']}"
    state: dict = {}
    async with client.listen(resource_subscriptions=[uri]) as changes:
        with anyio.fail_after(120):
            async for _ in changes:  # woken on each change, never polled
                state = json.loads((await client.read_resource(uri)).contents[0].text)
                if state["status"] == "completed":
                    break
    assert state["result"] == "via-resource\n" and state["dispatch_id"] == sent["dispatch_id"]

    seen: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(message or "")

    slow = await send(client, "sleep 1; echo done")
    result = await client.call_tool(
        "await_dispatch", {"dispatch_id": slow["dispatch_id"], "timeout_s": 120}, progress_callback=on_progress
    )
    assert result.structured_content["status"] == "completed"
    assert any("completed" in message for message in seen), seen
    with pytest.raises(Exception, match="unknown dispatch"):
        await client.read_resource("dockyard://dispatches/dsp_nope")


async def test_the_llm_runner_finishes_a_task_that_needs_several_tool_calls(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    def final(messages: list[dict]) -> dict:
        seen = json.loads(messages[-1]["content"])  # the exec result the runner handed back
        return {"role": "assistant", "content": f"the file holds: {seen['stdout'].strip()}"}

    turns = [
        lambda _: tool_call("write_file", path="calc/answer.txt", content="6*7=42"),
        lambda _: tool_call("read_file", path="calc/answer.txt"),
        lambda m: tool_call(
            "exec", command=f"test \"$(cat calc/answer.txt)\" = '{m[-1]['content']}' && cat calc/answer.txt; env"
        ),
        final,
    ]
    async with scripted_model(turns) as model:
        profile = {"kind": "llm", "url": model.url, "model": "scripted", "api_key": model.key}
        settings = make_settings(tmp_path / "data", runners={"script": {"kind": "script"}, "agent": profile})
        try:
            async with Engine.open(settings) as engine:
                who = engine.operator
                sent = await engine.dispatches.dispatch(
                    who,
                    mode="remote",
                    rationale="r",
                    task_summary="compute",
                    prompt="What is 6*7? Keep it in a file.",
                    runner="agent",
                )
                done = await engine.dispatches.wait(who, sent.dispatch_id, 120)
        finally:
            remove_instance(docker_client, settings)
    assert done.status == "completed", done.error
    assert done.result.startswith("the file holds: 6*7=42")
    assert "test-key" not in done.result and "DOCKYARD_RUN_ID=" + sent.dispatch_id in done.result  # the key stays out
    assert len(model.requests) == 4 and model.requests[0]["model"] == "scripted"
    assert {t["function"]["name"] for t in model.requests[0]["tools"]} == {"exec", "read_file", "write_file"}
    assert model.requests[0]["messages"][1] == {"role": "user", "content": "What is 6*7? Keep it in a file."}


async def test_an_llm_runner_that_cannot_reach_its_model_fails_with_the_reason(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    profile = {"kind": "llm", "url": "http://127.0.0.1:9/v1", "model": "none"}
    settings = make_settings(tmp_path / "data", runners={"script": {"kind": "script"}, "agent": profile})
    try:
        async with Engine.open(settings) as engine:
            sent = await engine.dispatches.dispatch(
                engine.operator, mode="remote", rationale="r", task_summary="t", prompt="hi", runner="agent"
            )
            done = await engine.dispatches.wait(engine.operator, sent.dispatch_id, 120)
    finally:
        remove_instance(docker_client, settings)
    assert done.status == "failed" and "could not be reached" in done.error


TEAM = ["echo alpha > a.txt; sleep 1; ls", "echo beta > b.txt; sleep 1; ls"]


async def test_team_members_share_one_sandbox_or_each_have_their_own_and_are_synthesized(client: Client) -> None:
    single = await call(
        client, "dispatch", mode="team_single_vm", rationale="r", task_summary="pair work", members=TEAM
    )
    multi = await call(client, "dispatch", mode="team_multi_vm", rationale="r", task_summary="split work", members=TEAM)
    shared = await call(client, "await_dispatch", dispatch_id=single["dispatch_id"], timeout_s=120)
    apart = await call(client, "await_dispatch", dispatch_id=multi["dispatch_id"], timeout_s=120)
    assert shared["status"] == apart["status"] == "completed"
    assert [m["result"] for m in shared["members"]] == [
        "a.txt\nb.txt\n",
        "a.txt\nb.txt\n",
    ]  # each sees the other's file
    assert len({m["sandbox_id"] for m in shared["members"]}) == 1
    assert [m["result"] for m in apart["members"]] == ["a.txt\n", "b.txt\n"]  # neither sees the other's
    assert len({m["sandbox_id"] for m in apart["members"]}) == 2
    assert apart["result"] == "[member 0] a.txt\n[member 1] b.txt\n"  # the synthesis holds every member's
    hinted = await call(
        client, "dispatch", mode="remote", rationale="r", task_summary="use a team for this", members=["echo x"]
    )
    assert hinted["mode"] == "team_multi_vm" and "use a team" in hinted["hint"]
    await call(client, "await_dispatch", dispatch_id=hinted["dispatch_id"], timeout_s=120)
    assert (await call(client, "sandbox_list"))["sandboxes"] == []  # every member's sandbox went back


async def test_a_runner_past_its_timeout_fails_with_the_reason_and_is_killed(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    settings = make_settings(tmp_path / "data", runners={"script": {"kind": "script", "timeout_s": 1}})
    try:
        async with Engine.open(settings) as engine:
            who = engine.operator
            mine = await engine.sandboxes.create(who)
            sent = await engine.dispatches.dispatch(
                who,
                mode="local",
                rationale="r",
                task_summary="t",
                sandbox_id=mine.sandbox_id,
                prompt="sleep 30 & sleep 31",
            )
            done = await engine.dispatches.wait(who, sent.dispatch_id, 60)
            assert done.status == "failed" and "timed out after 1 s" in done.error
            left = await engine.sandboxes.exec(who, mine.sandbox_id, "ps -eo args= | grep -c '^sleep 3[01]' || true")
            assert left.stdout.strip() == "0"  # the runner and what it started are gone
    finally:
        remove_instance(docker_client, settings)


def host_settings(tmp_path: Path, timeout_s: int = 600, **operator: object) -> Settings:
    workdir = tmp_path / "host"
    workdir.mkdir(exist_ok=True)
    runners = {
        "script": {"kind": "script", "timeout_s": timeout_s},
        "echo": {"kind": "command", "argv": ["echo", "{prompt}"]},
    }
    return make_settings(
        tmp_path / "data",
        default_pool={"min": 0, "max": 2},
        runners=runners,
        dispatch={"user_pc": {"enabled": True, "workdir": str(workdir)}},
        operator=operator,
    )


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie waiting to be reaped does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def answering(action: str, run: bool = True, asked: list[str] | None = None):
    async def answer(context: object, params: types.ElicitRequestParams) -> types.ElicitResult:
        if asked is not None:
            asked.append(params.message)
        content = {"run_on_this_computer": run} if action == "accept" else None
        return types.ElicitResult(action=action, content=content)

    return answer


async def test_user_pc_runs_on_this_machine_only_after_the_user_confirms(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    settings = host_settings(tmp_path)
    workdir = tmp_path / "host"
    script = "pwd; echo id=$DOCKYARD_DISPATCH_ID; touch made-here"
    asked: list[str] = []
    try:
        server = build_server(settings)
        async with Client(server, elicitation_callback=answering("accept", asked=asked)) as client:
            sent = await send(client, script, mode="user_pc", summary="touch a file at home")
            assert sent["mode"] == "user_pc" and len(asked) == 1
            assert (
                "outside any sandbox" in asked[0]
                and "touch a file at home" in asked[0]
                and "touch made-here" in asked[0]
            )
            done = await call(client, "await_dispatch", dispatch_id=sent["dispatch_id"], timeout_s=60)
            assert done["status"] == "completed"
            assert done["result"] == f"{workdir}\nid={sent['dispatch_id']}\n" and (workdir / "made-here").exists()
            # A phrase that makes it remote runs in a sandbox and asks nothing.
            remote = await send(client, "echo in-sandbox", mode="user_pc", summary="run it in a clean environment")
            assert remote["mode"] == "remote" and len(asked) == 1
            assert (await call(client, "await_dispatch", dispatch_id=remote["dispatch_id"], timeout_s=120))[
                "status"
            ] == "completed"
        (workdir / "made-here").unlink()
        for answer, why in (
            (answering("accept", run=False), "declined"),
            (answering("decline"), "declined"),
            (answering("cancel"), "dismissed"),
            (None, "cannot ask"),
        ):
            async with Client(server, elicitation_callback=answer) as client:
                assert why in await call_error(
                    client, "dispatch", mode="user_pc", rationale="r", task_summary="t", prompt=script
                )
        assert not (workdir / "made-here").exists()
        decisions = [d for d in rows(settings, DispatchDecision) if d.used_mode == "user_pc"]
        assert [d.outcome for d in decisions] == ["accepted", "refused", "refused", "refused", "refused"]
        created = [a for a in rows(settings, AuditEvent) if a.kind == "dispatch.create"]
        assert [json.loads(a.detail)["consent"] for a in created] == [
            "confirmed",
            None,
            "declined",
            "declined",
            "cancelled",
            "unavailable",
        ]
    finally:
        remove_instance(docker_client, settings)


async def test_user_pc_needs_its_scope_and_a_runner_allowed_on_the_host(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    settings = host_settings(tmp_path, scopes=["dispatch:create", "dispatch:read"])
    asked: list[str] = []
    try:
        async with Client(build_server(settings), elicitation_callback=answering("accept", asked=asked)) as client:
            refused = await call_error(
                client, "dispatch", mode="user_pc", rationale="r", task_summary="t", prompt="touch x"
            )
            assert "dispatch:user_pc" in refused and asked == []
        settings = host_settings(tmp_path, scopes=["*"])
        async with Client(build_server(settings), elicitation_callback=answering("accept", asked=asked)) as client:
            refused = await call_error(
                client, "dispatch", mode="user_pc", rationale="r", task_summary="t", prompt="x", runner="echo"
            )
            assert "may not run on the host; allowed there: script" in refused and asked == []
        assert not (tmp_path / "host" / "x").exists()
    finally:
        remove_instance(docker_client, settings)


async def test_a_dispatch_waits_queued_for_a_full_pool_and_fails_clearly_when_it_cannot_serve(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    settings = make_settings(tmp_path / "data", default_pool={"min": 0, "max": 1}, pool={"claim_timeout_s": 3.0})
    try:
        async with Client(build_server(settings)) as client:
            held = (await call(client, "sandbox_create"))["sandbox_id"]
            sent = await send(client, "echo never")
            await anyio.sleep(1)
            assert (await call(client, "await_dispatch", dispatch_id=sent["dispatch_id"], timeout_s=0))[
                "status"
            ] == "queued"
            done = await call(client, "await_dispatch", dispatch_id=sent["dispatch_id"], timeout_s=60)
            assert done["status"] == "failed" and "at its max of 1" in done["error"] and done["sandbox_id"] is None
            # Once the pool has room, the same dispatch sent again runs.
            await call(client, "sandbox_destroy", sandbox_id=held)
            again = await send(client, "echo now")
            assert (await call(client, "await_dispatch", dispatch_id=again["dispatch_id"], timeout_s=120))[
                "result"
            ] == "now\n"
        finished = [a for a in rows(settings, AuditEvent) if a.kind == "dispatch.finish"]
        assert [(a.target, a.outcome) for a in finished] == [
            (sent["dispatch_id"], "error"),
            (again["dispatch_id"], "ok"),
        ]
        assert "at its max of 1" in json.loads(finished[0].detail)["error"]
    finally:
        remove_instance(docker_client, settings)


async def test_a_user_pc_run_past_its_timeout_is_killed_with_everything_it_started(
    tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient
) -> None:
    settings = host_settings(tmp_path, timeout_s=2)
    try:
        async with Client(build_server(settings), elicitation_callback=answering("accept")) as client:
            sent = await send(client, "sleep 300 & echo $! > child.pid; echo started; sleep 300", mode="user_pc")
            done = await call(client, "await_dispatch", dispatch_id=sent["dispatch_id"], timeout_s=60)
        assert done["status"] == "failed" and "timed out after 2 s" in done["error"] and done["result"] == "started\n"
        child = int((tmp_path / "host" / "child.pid").read_text())
        with anyio.fail_after(10):
            while alive(child):
                await anyio.sleep(0.1)
    finally:
        remove_instance(docker_client, settings)
