"""Results that fit a context window: every tool result within the result budget, with the rest
reachable (an exec's full output as a resource, a file's next page, an audit cursor).

Sizes are measured as the client receives them: the JSON of the structured result."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from mcp import Client
from mcp.types import BlobResourceContents, CallToolResult, EmbeddedResource, TextContent, TextResourceContents

from dockyard.runtime.substrate.settings import Settings
from dockyard.server.app import build_server
from tests.conftest import call, call_error, make_settings, remove_instance, sh
from tests.tools.test_teams import all_idle, in_sandbox, members, until

pytestmark = pytest.mark.anyio

BUDGET = 16000
OVERHEAD = 1500  # the result's other fields and JSON escaping


def size(result: dict[str, Any]) -> int:
    return len(json.dumps(result, ensure_ascii=False))  # as the wire carries it: UTF-8, not \\u escapes


async def read_text(client: Client, uri: str) -> str:
    read = await client.read_resource(uri)
    assert isinstance(read.contents[0], TextResourceContents)
    return read.contents[0].text


async def test_a_200_kb_output_keeps_head_and_tail_within_the_budget_and_links_the_full_output(
    client: Client,
) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    ran = await sh(client, sid, "for i in $(seq 1 20000); do echo line-$i-xxxxx; done; echo THE-LAST-LINE")
    assert size(ran) <= BUDGET + OVERHEAD
    assert ran["stdout"].startswith("line-1-xxxxx\n")
    assert ran["stdout"].rstrip("\n").endswith("THE-LAST-LINE")
    assert " bytes omitted " in ran["stdout"]
    assert ran["stdout_uri"] == f"dockyard://sandboxes/{sid}/execs/{ran['exec_n']}/stdout"
    assert ran["stderr_uri"] is None  # nothing of stderr was cut

    full = await read_text(client, ran["stdout_uri"])
    assert 60_000 < len(full.encode()) <= 65536 + 200  # the output cap, head and tail
    assert full.startswith("line-1-xxxxx\n") and full.rstrip("\n").endswith("THE-LAST-LINE")
    assert "over the 65536-byte output cap" in full


async def test_stdout_and_stderr_share_the_budget_and_errors_at_the_tail_survive(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    ran = await sh(
        client, sid, "seq 1 30000; for i in $(seq 1 5000); do echo warn-$i >&2; done; echo 'Error: it broke' >&2"
    )
    assert size(ran) <= BUDGET + OVERHEAD
    assert ran["stdout"].rstrip().endswith("30000") and ran["stderr"].rstrip().endswith("Error: it broke")
    assert ran["stdout_uri"] and ran["stderr_uri"]
    assert (await read_text(client, ran["stderr_uri"])).rstrip().endswith("Error: it broke")


@pytest.fixture
def few_kept(tmp_path: Path, sandbox_image: str, docker_client: docker.DockerClient) -> Iterator[Settings]:
    settings = make_settings(tmp_path / "few", sandbox={"exec_outputs_kept": 3})
    yield settings
    remove_instance(docker_client, settings)


async def test_outputs_are_numbered_per_sandbox_and_only_the_newest_are_kept(few_kept: Settings) -> None:
    async with Client(build_server(few_kept)) as client:
        sid = (await call(client, "sandbox_create"))["sandbox_id"]
        numbers = [(await sh(client, sid, f"echo run-{i}"))["exec_n"] for i in range(5)]
        assert numbers == [1, 2, 3, 4, 5]
        assert await read_text(client, f"dockyard://sandboxes/{sid}/execs/5/stdout") == "run-4\n"
        assert await read_text(client, f"dockyard://sandboxes/{sid}/execs/3/stdout") == "run-2\n"
        with pytest.raises(Exception, match="keeps no output 2"):
            await client.read_resource(f"dockyard://sandboxes/{sid}/execs/2/stdout")
        await call(client, "sandbox_destroy", sandbox_id=sid)


async def test_a_destroyed_sandboxs_outputs_are_gone(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    ran = await sh(client, sid, "echo secret-output")
    uri = f"dockyard://sandboxes/{sid}/execs/{ran['exec_n']}/stdout"
    assert await read_text(client, uri) == "secret-output\n"
    await call(client, "sandbox_destroy", sandbox_id=sid)
    with pytest.raises(Exception, match="unknown sandbox"):
        await client.read_resource(uri)


async def test_guessing_the_number_of_another_sandboxs_output_reads_nothing(client: Client) -> None:
    one = (await call(client, "sandbox_create"))["sandbox_id"]
    two = (await call(client, "sandbox_create"))["sandbox_id"]
    for _ in range(3):
        await sh(client, one, "echo only-in-one")
    assert (await sh(client, two, "echo in-two"))["exec_n"] == 1
    with pytest.raises(Exception, match="keeps no output 3"):
        await client.read_resource(f"dockyard://sandboxes/{two}/execs/3/stdout")
    with pytest.raises(Exception, match="unknown sandbox"):
        await client.read_resource("dockyard://sandboxes/sbx_0000000000000000/execs/1/stdout")


async def test_a_small_output_is_whole_and_links_nothing(client: Client, settings: Settings) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    ran = await sh(client, sid, "echo hi; echo there >&2")
    assert (ran["stdout"], ran["stderr"], ran["stdout_uri"], ran["stderr_uri"]) == ("hi\n", "there\n", None, None)
    assert settings.results.budget_chars == BUDGET


PEEK = """
import sys
import anyio
from mcp import Client, StdioServerParameters

async def main(uri):
    async with Client(StdioServerParameters(command="dockyard-bridge")) as client:
        try:
            read = await client.read_resource(uri)
            print("READ", read.contents[0].text)
        except Exception as exc:
            print("REFUSED", exc)

anyio.run(main, sys.argv[1])
"""


async def test_a_command_in_one_sandbox_cannot_read_the_outputs_of_another_through_the_bridge(
    client: Client,
) -> None:
    """The attacker is a program in sandbox `two`, holding that sandbox's own token."""
    one = (await call(client, "sandbox_create"))["sandbox_id"]
    two = (await call(client, "sandbox_create"))["sandbox_id"]
    ran = await sh(client, one, "echo secret-of-one")
    await call(client, "sandbox_write_file", sandbox_id=two, path="peek.py", content=PEEK)
    uri = f"dockyard://sandboxes/{one}/execs/{ran['exec_n']}/stdout"
    peek = await sh(client, two, f"/opt/dockyard/client/bin/python peek.py {uri}", timeout_s=120)
    assert peek["stdout"].startswith("REFUSED") and "unknown sandbox" in peek["stdout"], peek
    assert "secret-of-one" not in peek["stdout"]
    own = await sh(client, two, f"/opt/dockyard/client/bin/python peek.py {uri.replace(one, two)}", timeout_s=120)
    assert own["stdout"].startswith("READ"), own  # its own sandbox's outputs it may read


def wire_size(result: CallToolResult) -> int:
    """The whole result as the client received it: every content block and the structured part."""
    return len(result.model_dump_json(by_alias=True, exclude_none=True))


async def test_a_3_mib_binary_file_reads_in_pages_of_embedded_blobs_within_the_budget(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    await sh(client, sid, "head -c 3145728 /dev/urandom > big.bin && sha256sum big.bin > big.sum")
    first = await client.call_tool("sandbox_read_file", {"sandbox_id": sid, "path": "big.bin"})
    assert not first.is_error and wire_size(first) <= BUDGET + OVERHEAD
    page = first.structured_content
    assert page is not None
    assert (page["encoding"], page["content"], page["size"], page["has_more"]) == ("binary", "", 3145728, True)
    assert not any(isinstance(block, TextContent) and len(block.text) > 2000 for block in first.content)
    [embedded] = [block for block in first.content if isinstance(block, EmbeddedResource)]
    assert isinstance(embedded.resource, BlobResourceContents)
    assert len(base64.b64decode(embedded.resource.blob)) == page["length"] == page["next_offset"] > 8000

    # a page far into the file is the file's bytes at that offset
    far = await client.call_tool(
        "sandbox_read_file", {"sandbox_id": sid, "path": "big.bin", "offset": 3145728 - 100, "length": 4096}
    )
    assert far.structured_content is not None and wire_size(far) <= BUDGET + OVERHEAD
    assert (far.structured_content["length"], far.structured_content["has_more"]) == (100, False)
    [embedded] = [block for block in far.content if isinstance(block, EmbeddedResource)]
    assert isinstance(embedded.resource, BlobResourceContents)
    tail = (await sh(client, sid, "tail -c 100 big.bin | base64 -w0"))["stdout"]
    assert base64.b64decode(embedded.resource.blob) == base64.b64decode(tail)


async def test_a_large_text_file_pages_through_whole_within_the_budget(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    await sh(client, sid, 'for i in $(seq 1 12000); do echo "ligne-$i é \\"quoted\\""; done > big.txt')
    expected = (await sh(client, sid, "wc -c < big.txt"))["stdout"].strip()
    pages, offset, text = 0, 0, ""
    while True:
        result = await client.call_tool("sandbox_read_file", {"sandbox_id": sid, "path": "big.txt", "offset": offset})
        assert not result.is_error
        page = result.structured_content
        assert page is not None and size(page) <= BUDGET + OVERHEAD and page["encoding"] == "utf-8"
        text += page["content"]
        pages += 1
        if not page["has_more"]:
            break
        offset = page["next_offset"]
    assert len(text.encode()) == int(expected) == page["size"] and pages > 5
    lines = text.splitlines()
    assert lines[0] == 'ligne-1 é "quoted"' and lines[-1] == 'ligne-12000 é "quoted"' and len(lines) == 12000


async def test_bad_pages_are_refused_with_what_is_allowed(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    await sh(client, sid, "printf 'abc\\0def' > nul.bin; echo text > t.txt")
    assert "read cap" in await call_error(client, "sandbox_read_file", sandbox_id=sid, path="t.txt", length=1 << 30)
    reach = await call_error(client, "sandbox_read_file", sandbox_id=sid, path="t.txt", offset=1 << 30)
    assert "sandbox_exec" in reach
    assert "not UTF-8" in await call_error(
        client, "sandbox_read_file", sandbox_id=sid, path="nul.bin", encoding="utf-8"
    )
    past = await call(client, "sandbox_read_file", sandbox_id=sid, path="t.txt", offset=100)
    assert (past["content"], past["length"], past["has_more"], past["size"]) == ("", 0, False, 5)


async def test_audit_query_after_many_execs_fits_the_budget_and_pages_through_everything(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    body = "x" * 900  # a long command body, as real commands are
    for i in range(120):
        await sh(client, sid, f"echo {i} # {body}")
    everything = await call(client, "audit_query", limit=1000)
    assert size(everything) <= BUDGET + OVERHEAD and everything["more"] and everything["next_cursor"]
    assert all(row["detail"] is None for row in everything["rows"])

    ids: list[int] = []
    cursor = None
    pages = 0
    while True:
        page = await call(client, "audit_query", limit=1000, details=True, **({"cursor": cursor} if cursor else {}))
        assert size(page) <= BUDGET + OVERHEAD
        ids += [row["id"] for row in page["rows"]]
        pages += 1
        if not page["more"]:
            assert page["next_cursor"] is None
            break
        cursor = page["next_cursor"]
    assert pages > 5 and ids == sorted(ids, reverse=True) and len(ids) == len(set(ids))
    assert sorted(ids) == list(range(1, ids[0] + 1))  # nothing lost on the way
    execs = [r for r in (await call(client, "audit_query", kind="sandbox.exec", details=True, limit=3))["rows"]]
    assert body in execs[0]["detail"]["command"]


async def test_a_forged_or_foreign_cursor_is_refused_cleanly(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    for _ in range(3):
        await sh(client, sid, "true")
    page = await call(client, "audit_query", limit=2)
    cursor = page["next_cursor"]
    assert cursor
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    forged = base64.urlsafe_b64encode(raw[:16] + b'{"b": 999999}').decode().rstrip("=")
    for bad in (forged, "not-a-cursor", cursor[:-2] + "AA", "%%%"):
        message = await call_error(client, "audit_query", limit=2, cursor=bad)
        assert "cursor is not one this server gave" in message and "leave cursor out" in message, bad
    # the cursor of one query does not carry over to other filters
    message = await call_error(client, "audit_query", limit=2, cursor=cursor, kind="sandbox.exec")
    assert "cursor is not one this server gave" in message
    assert (await call(client, "audit_query", limit=2, cursor=cursor))["rows"][0]["id"] < page["rows"][-1]["id"] + 1


FINISHER = in_sandbox("""
for n in range(30):
    task = (await attempt(client, "team_claim", team_id=TEAM))["task_id"]
    await attempt(client, "team_complete", team_id=TEAM, task_id=task, result=f"R{n}-" + "y" * 6000 + "-END")
print("finished")
""")


async def test_team_tasks_is_a_summary_by_default_and_pages_details_within_the_budget(client: Client) -> None:
    team = (await call(client, "team_create", name="budget"))["team_id"]
    tasks = [{"title": f"task {n}", "detail": "d" * 3000} for n in range(120)]
    await call(client, "team_add_tasks", team_id=team, tasks=tasks)
    await call(client, "team_spawn", team_id=team, role="finisher", prompt=FINISHER)
    view = await until(client, team, all_idle(1), timeout_s=240)
    assert members(view)["finisher"]["last_output"].strip() == "finished"

    seen: list[str] = []
    offset = 0
    while True:
        page = await call(client, "team_tasks", team_id=team, offset=offset)
        assert size(page) <= BUDGET + OVERHEAD
        for task in page["tasks"]:
            assert task["detail"] is None and len(task["result"] or "") <= 200
            seen.append(task["task_id"])
        if not page["has_more"]:
            break
        offset = page["next_offset"]
    assert len(seen) == len(set(seen)) == 120
    done = [t for t in (await call(client, "team_tasks", team_id=team))["tasks"] if t["status"] == "done"]
    assert done and done[0]["result"].startswith("R") and done[0]["result"].endswith("-END")  # head and tail

    full = await call(client, "team_tasks", team_id=team, task_id=done[0]["task_id"])
    [one] = full["tasks"]
    assert size(full) <= BUDGET + OVERHEAD and one["detail"] == "d" * 3000
    assert one["result"].startswith("R") and one["result"].endswith("-END") and len(one["result"]) > 4000

    detailed, offset = 0, 0
    while True:
        page = await call(client, "team_tasks", team_id=team, detail=True, offset=offset)
        assert size(page) <= BUDGET + OVERHEAD and all(t["detail"] for t in page["tasks"])
        detailed += len(page["tasks"])
        if not page["has_more"]:
            break
        offset = page["next_offset"]
    assert detailed == 120
    assert "has no task" in await call_error(client, "team_tasks", team_id=team, task_id="task_nope")


async def test_await_dispatch_cuts_a_long_result_and_the_dispatch_resource_holds_all_of_it(client: Client) -> None:
    sent = await call(
        client,
        "dispatch",
        mode="remote",
        rationale="test",
        task_summary="a long result",
        prompt="for i in $(seq 1 8000); do echo result-line-$i; done; echo FINAL-LINE",
    )
    done = await call(client, "await_dispatch", dispatch_id=sent["dispatch_id"], timeout_s=120)
    assert done["status"] == "completed" and size(done) <= BUDGET + OVERHEAD
    assert done["result"].rstrip().endswith("FINAL-LINE")
    uri = f"dockyard://dispatches/{sent['dispatch_id']}"
    assert f"(all of it: {uri})" in done["result"]
    whole = json.loads(await read_text(client, uri))["result"]
    assert len(whole) > 2 * BUDGET and whole.rstrip().endswith("result-line-8000\nFINAL-LINE")
    assert whole.startswith(done["result"][:1000])  # the head shown is the head of the whole


async def test_a_listing_of_many_files_fits_the_budget_and_says_it_was_cut(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    await sh(
        client, sid, "mkdir many && cd many && for i in $(seq 1 900); do touch file-with-a-longish-name-$i.txt; done"
    )
    listing = await call(client, "sandbox_list_files", sandbox_id=sid, path="many")
    assert size(listing) <= BUDGET + OVERHEAD and listing["truncated"] is True and 50 < len(listing["entries"]) < 900
    few = await call(client, "sandbox_list_files", sandbox_id=sid, path="many", max_entries=5)
    assert len(few["entries"]) == 5
