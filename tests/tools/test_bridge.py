"""dockyard-bridge: a program inside a sandbox with no network, using the official MCP client
the image ships, reaches dockyard's tools through the sandbox's supervisor, acting as the
sandbox's owner, or as a token bound to that sandbox (a dispatch run's); dockyard-call does
the same from a shell."""

from __future__ import annotations

import json
import subprocess

import anyio
import docker
import pytest
from mcp import Client
from sqlmodel import Session, create_engine, select

from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import Runtime
from tests.conftest import call, container_of, sh

pytestmark = pytest.mark.anyio

# The image's own MCP SDK, in a venv of its own (config/images/sandbox/wheels.txt).
CLIENT_PYTHON = "/opt/dockyard/client/bin/python"

ASK = """
import json, sys
import anyio
from mcp import Client, StdioServerParameters

async def main(own, other):
    async with Client(StdioServerParameters(command="dockyard-bridge")) as client:
        async def attempt(tool, **arguments):
            result = await client.call_tool(tool, arguments)
            return {"error": result.content[0].text} if result.is_error else result.structured_content
        print(json.dumps({
            "tools": sorted(tool.name for tool in (await client.list_tools()).tools),
            "whoami": await attempt("whoami"),
            "own": await attempt("sandbox_exec", sandbox_id=own, command="echo from-inside"),
            "listed": await attempt("sandbox_list"),
            "other": await attempt("sandbox_exec", sandbox_id=other, command="echo escaped"),
            "create": await attempt("sandbox_create"),
            "mint": await attempt("token_mint", scopes=["sandbox:exec"]),
            "audit": await attempt("audit_query"),
        }))

anyio.run(main, sys.argv[1], sys.argv[2])
"""

INITIALIZE = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "probe", "version": "0"},
        },
    }
)


async def test_official_client_in_a_networkless_sandbox_uses_dockyard_through_the_bridge(
    client: Client, settings: Settings, docker_client: docker.DockerClient
) -> None:
    sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
    info = container_of(docker_client, settings, sandbox_id)
    assert info["HostConfig"]["NetworkMode"] == "none"
    await call(client, "sandbox_write_file", sandbox_id=sandbox_id, path="ask.py", content=ASK)

    other = (await call(client, "sandbox_create"))["sandbox_id"]
    command = f"{CLIENT_PYTHON} ask.py {sandbox_id} {other}"
    result = await sh(client, sandbox_id, command, timeout_s=120)
    assert result["exit_code"] == 0, result["stderr"][-2000:]
    answer = json.loads(result["stdout"])
    # Listed: what the sandbox's own token may do; the rest is refused when called anyway (below).
    assert {"whoami", "sandbox_exec", "sandbox_read_file", "dispatch_submit"} <= set(answer["tools"])
    assert not {"sandbox_create", "token_mint", "audit_query"} & set(answer["tools"])
    # The bridge acts with the sandbox's own token: its owner's attribution, that sandbox only.
    who = answer["whoami"]
    assert (who["workspace_id"], who["user_id"], who["sandbox_id"]) == ("local", "operator", sandbox_id)
    assert sorted(who["scopes"]) == ["sandbox:exec", "sandbox:files"] and who["token_id"].startswith("tok_")
    assert answer["own"]["stdout"] == "from-inside\n"
    assert [s["sandbox_id"] for s in answer["listed"]["sandboxes"]] == [sandbox_id]
    assert "unknown sandbox" in answer["other"]["error"]
    assert "sandbox:create" in answer["create"]["error"]
    assert "token:mint" in answer["mint"]["error"]
    assert "audit:read" in answer["audit"]["error"]
    outside = sorted(s["sandbox_id"] for s in (await call(client, "sandbox_list"))["sandboxes"])
    assert outside == sorted([sandbox_id, other])  # nothing was made from inside


async def test_a_bridge_in_a_runtime_nobody_claimed_gets_no_answer(
    client: Client, settings: Settings, docker_client: docker.DockerClient
) -> None:
    with anyio.fail_after(60):
        while (await call(client, "pool_status"))["pools"][0]["warm"] < 1:
            await anyio.sleep(0.1)
    with Session(create_engine(f"sqlite:///{settings.store_path}")) as session:
        warm = session.exec(select(Runtime).where(Runtime.state == "warm")).first()
    assert warm is not None and warm.container_id
    probe = subprocess.run(
        ["docker", "exec", "-i", "-u", "agent", warm.container_id, "dockyard-bridge"],
        input=INITIALIZE + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0 and probe.stdout == "", (probe.stdout, probe.stderr)


SUBMIT = """
import json, os
import anyio
from mcp import Client, StdioServerParameters

async def main():
    dispatch_id, proof = os.environ["DOCKYARD_DISPATCH_ID"], os.environ["DOCKYARD_TOKEN"]
    bridge = StdioServerParameters(command="dockyard-bridge", env={"DOCKYARD_TOKEN": proof})
    async with Client(bridge) as client:
        async def submit(result, proof):
            answer = await client.call_tool("dispatch_submit", {"dispatch_id": dispatch_id, "result": result, "proof": proof})
            return answer.content[0].text if answer.is_error else "accepted"
        seen = {
            "forged": await submit("forged", "dyt_forged-token"),
            "first": await submit("from inside the runtime", proof),
            "replayed": await submit("replayed", proof),
        }
    with open("submissions.json", "w") as fh:
        json.dump(seen, fh)
    print("stdout is not the result once one was submitted")

anyio.run(main)
"""


async def test_a_runner_submits_its_result_through_the_bridge_once_with_its_run_token(client: Client) -> None:
    sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
    await call(client, "sandbox_write_file", sandbox_id=sandbox_id, path="submit.py", content=SUBMIT)
    sent = await call(
        client,
        "dispatch",
        mode="local",
        rationale="r",
        task_summary="t",
        sandbox_id=sandbox_id,
        prompt=f"{CLIENT_PYTHON} submit.py",
    )
    done = await call(client, "await_dispatch", dispatch_id=sent["dispatch_id"], timeout_s=120)
    assert (done["status"], done["result"]) == ("completed", "from inside the runtime"), done
    seen = json.loads(
        (await call(client, "sandbox_read_file", sandbox_id=sandbox_id, path="submissions.json"))["content"]
    )
    assert seen["first"] == "accepted"
    assert "not this run's token" in seen["forged"]
    assert "already submitted" in seen["replayed"]
    audited = (await call(client, "audit_query", details=True, kind="dispatch.submit"))["rows"]
    assert sorted(row["outcome"] for row in audited) == ["denied", "denied", "ok"]


async def dispatch_here(client: Client, sandbox_id: str, prompt: str) -> str:
    """Start a `local` dispatch in the sandbox (its runner gets a run token bound to it)."""
    sent = await call(
        client, "dispatch", mode="local", rationale="r", task_summary="t", sandbox_id=sandbox_id, prompt=prompt
    )
    return sent["dispatch_id"]


async def test_a_runners_bridge_acts_as_its_run_token_not_as_the_sandbox_owner(client: Client) -> None:
    sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
    plain = await sh(client, sandbox_id, "dockyard-call whoami", timeout_s=60)
    assert plain["exit_code"] == 0, plain["stderr"]
    owner = json.loads(plain["stdout"])
    assert (owner["run_id"], owner["sandbox_id"]) == (None, sandbox_id)

    dispatch_id = await dispatch_here(client, sandbox_id, "dockyard-call whoami")
    done = await call(client, "await_dispatch", dispatch_id=dispatch_id, timeout_s=120)
    assert done["status"] == "completed", done
    runner = json.loads(done["result"])
    assert (runner["workspace_id"], runner["user_id"]) == ("local", "operator")
    assert (runner["run_id"], runner["sandbox_id"]) == (dispatch_id, sandbox_id)
    assert sorted(runner["scopes"]) == ["dispatch:read", "sandbox:exec", "sandbox:files"]
    assert runner["token_id"].startswith("tok_") and runner["token_id"] != owner["token_id"]


async def test_a_token_of_another_sandbox_or_no_token_at_all_gets_the_session_closed(client: Client) -> None:
    here = (await call(client, "sandbox_create"))["sandbox_id"]
    there = (await call(client, "sandbox_create"))["sandbox_id"]
    # A runner in `there` holds a live run token bound to `there` until it is released.
    dispatch_id = await dispatch_here(
        client, there, 'printf %s "$DOCKYARD_TOKEN" > token && while [ ! -e release ]; do sleep 0.1; done'
    )
    read = await sh(client, there, "for i in $(seq 300); do [ -s token ] && break; sleep 0.1; done; cat token")
    token = read["stdout"]
    assert token.startswith("dyt_"), read

    foreign = await sh(client, here, f"DOCKYARD_TOKEN={token} dockyard-call whoami", timeout_s=60)
    garbage = await sh(client, here, "DOCKYARD_TOKEN=dyt_not-a-real-token dockyard-call whoami", timeout_s=60)
    for refused in (foreign, garbage):
        assert refused["exit_code"] == 1 and refused["stdout"] == "", refused
        assert "closed the session unanswered" in refused["stderr"], refused["stderr"]
    # The same token serves in its own sandbox: the refusal was about where it was used.
    home = await sh(client, there, f"DOCKYARD_TOKEN={token} dockyard-call whoami", timeout_s=60)
    assert home["exit_code"] == 0, home["stderr"]
    assert json.loads(home["stdout"])["run_id"] == dispatch_id
    # Without a token, a session stays the sandbox owner's even while a run is bound to it.
    plain = await sh(client, there, "dockyard-call whoami", timeout_s=60)
    assert plain["exit_code"] == 0 and json.loads(plain["stdout"])["run_id"] is None, plain

    await call(client, "sandbox_write_file", sandbox_id=there, path="release", content="")
    done = await call(client, "await_dispatch", dispatch_id=dispatch_id, timeout_s=60)
    assert done["status"] == "completed", done
    refusals = (await call(client, "audit_query", details=True, kind="bridge.token"))["rows"]
    assert sorted(row["outcome"] for row in refusals) == ["denied", "denied"]
    reasons = " ".join(json.dumps(row) for row in refusals)
    assert f"bound to {there}" in reasons and "unknown token" in reasons


async def test_dockyard_call_from_a_shell(client: Client) -> None:
    sandbox_id = (await call(client, "sandbox_create"))["sandbox_id"]
    listed = await sh(client, sandbox_id, "dockyard-call sandbox_list", timeout_s=60)
    assert listed["exit_code"] == 0, listed["stderr"]
    assert listed["stdout"].count("\n") == 1
    assert [s["sandbox_id"] for s in json.loads(listed["stdout"])["sandboxes"]] == [sandbox_id]

    arguments = json.dumps({"sandbox_id": sandbox_id, "command": "echo hi"})
    ran = await sh(client, sandbox_id, f"dockyard-call sandbox_exec '{arguments}'", timeout_s=60)
    assert ran["exit_code"] == 0 and json.loads(ran["stdout"])["stdout"] == "hi\n", ran

    names = await sh(client, sandbox_id, "dockyard-call --list", timeout_s=60)
    assert {"whoami", "sandbox_exec", "dispatch_submit"} <= set(names["stdout"].split()), names

    missing = await sh(client, sandbox_id, "dockyard-call nosuchtool", timeout_s=60)
    assert missing["exit_code"] == 1 and missing["stdout"] == "", missing
    assert "nosuchtool" in missing["stderr"]

    for bad in (
        "dockyard-call",
        "dockyard-call whoami 'not json'",
        "dockyard-call whoami '[1]'",
        "dockyard-call a b c",
    ):
        usage = await sh(client, sandbox_id, bad)
        assert usage["exit_code"] == 2 and "usage: dockyard-call" in usage["stderr"], (bad, usage)


async def test_a_token_that_is_not_utf8_gets_the_session_closed_and_the_refusal_audited(client: Client) -> None:
    """A program in the sandbox controls the bytes of DOCKYARD_TOKEN; odd ones are refused like
    any unknown token, the refusal is recorded, and the server keeps serving the sandbox."""
    here = (await call(client, "sandbox_create"))["sandbox_id"]
    odd = await sh(client, here, "DOCKYARD_TOKEN=\"$(printf 'dyt_\\377\\376')\" dockyard-call whoami", timeout_s=60)
    assert odd["exit_code"] == 1 and "closed the session unanswered" in odd["stderr"], odd
    [refusal] = (await call(client, "audit_query", details=True, kind="bridge.token"))["rows"]
    assert refusal["outcome"] == "denied" and "unknown token" in json.dumps(refusal), refusal
    assert (await sh(client, here, "dockyard-call whoami", timeout_s=60))["exit_code"] == 0
