"""Every sandbox tool through the official MCP client, against real Docker and SQLite."""

from __future__ import annotations

import base64
import json
import urllib.request

import anyio
import pytest
from mcp import Client
from mcp.types import BlobResourceContents, EmbeddedResource
from sqlmodel import Session, create_engine, select

from dockyard.runtime.engine import instance_id
from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.substrate.store import AuditEvent
from tests.conftest import call, call_error, runtime_row, sandbox_row, sh

pytestmark = pytest.mark.anyio


def audit_rows(settings: Settings) -> list[AuditEvent]:
    """The audit table, read straight from the SQLite file."""
    with Session(create_engine(f"sqlite:///{settings.store_path}")) as session:
        return list(session.exec(select(AuditEvent).order_by(AuditEvent.id)).all())


async def test_hello_world_round_trip_through_snapshot_is_fully_audited(client: Client, settings: Settings) -> None:
    """The foundation's promise end to end: write, run, snapshot, restore, destroy."""
    first = (await call(client, "sandbox_create"))["sandbox_id"]
    await call(
        client, "sandbox_write_file", sandbox_id=first, path="hello.py", content="print('hello from dockyard')\n"
    )
    ran = await sh(client, first, "python3 hello.py")
    assert (ran["exit_code"], ran["stdout"]) == (0, "hello from dockyard\n")
    snapshot = await call(client, "sandbox_snapshot", sandbox_id=first, label="after hello")
    second = (await call(client, "sandbox_create", from_snapshot=snapshot["snapshot_id"]))["sandbox_id"]
    assert second != first
    assert (await sh(client, second, "python3 hello.py"))["stdout"] == "hello from dockyard\n"
    await call(client, "sandbox_destroy", sandbox_id=first)
    await call(client, "sandbox_destroy", sandbox_id=second)
    assert (await call(client, "sandbox_list"))["sandboxes"] == []

    steps = [(row.kind, row.target, row.outcome) for row in audit_rows(settings)]
    for expected in [
        ("sandbox.create", first, "ok"),
        ("sandbox.write_file", first, "ok"),
        ("sandbox.exec", first, "ok"),
        ("sandbox.snapshot", first, "ok"),
        ("sandbox.create", second, "ok"),
        ("sandbox.exec", second, "ok"),
        ("sandbox.destroy", first, "ok"),
        ("sandbox.destroy", second, "ok"),
    ]:
        assert expected in steps
    for row in audit_rows(settings):
        assert row.user_id == "operator" and row.workspace_id == "local" and row.duration_ms >= 0


async def test_exec_reports_exit_code_stderr_stdin_cwd_and_env(client: Client) -> None:
    sid = (await call(client, "sandbox_create", env={"GREETING": "hi"}))["sandbox_id"]
    failed = await sh(client, sid, "echo out; echo err >&2; exit 7")
    assert (failed["exit_code"], failed["stdout"], failed["stderr"], failed["timed_out"]) == (
        7,
        "out\n",
        "err\n",
        False,
    )
    assert (await sh(client, sid, "tr a-z A-Z", stdin="shout"))["stdout"] == "SHOUT"
    await sh(client, sid, "mkdir -p sub/dir")
    assert (await sh(client, sid, "pwd", cwd="sub/dir"))["stdout"] == "/workspace/sub/dir\n"
    assert (await sh(client, sid, "echo $GREETING $EXTRA", env={"EXTRA": "there"}))["stdout"] == "hi there\n"
    assert "'..'" in await call_error(client, "sandbox_exec", sandbox_id=sid, command="pwd", cwd="../etc")


async def test_exec_streams_output_as_progress_notifications_while_running(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    seen: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message))

    command = "for i in 1 2 3; do echo line$i; sleep 0.4; done"
    result = await client.call_tool(
        "sandbox_exec", {"sandbox_id": sid, "command": command}, progress_callback=on_progress
    )
    assert not result.is_error
    streamed = "".join(message or "" for _, message in seen)
    assert "line1" in streamed and "line3" in streamed
    assert len(seen) >= 2, "output should arrive in several notifications, not only at the end"
    assert [p for p, _ in seen] == sorted(p for p, _ in seen)


async def test_files_round_trip_text_and_binary_and_list_with_types(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    written = await call(client, "sandbox_write_file", sandbox_id=sid, path="/workspace/src/app.txt", content="héllo")
    assert written == {"path": "src/app.txt", "size": len("héllo".encode())}
    blob = bytes(range(256))
    await call(
        client,
        "sandbox_write_file",
        sandbox_id=sid,
        path="data.bin",
        content=base64.b64encode(blob).decode(),
        encoding="base64",
    )

    text = await call(client, "sandbox_read_file", sandbox_id=sid, path="src/app.txt")
    assert (text["content"], text["encoding"], text["has_more"]) == ("héllo", "utf-8", False)
    binary = await client.call_tool("sandbox_read_file", {"sandbox_id": sid, "path": "data.bin"})
    assert binary.structured_content is not None and binary.structured_content["encoding"] == "binary"
    [embedded] = [block for block in binary.content if isinstance(block, EmbeddedResource)]
    assert isinstance(embedded.resource, BlobResourceContents) and base64.b64decode(embedded.resource.blob) == blob
    head = await client.call_tool("sandbox_read_file", {"sandbox_id": sid, "path": "data.bin", "length": 10})
    [embedded] = [block for block in head.content if isinstance(block, EmbeddedResource)]
    assert isinstance(embedded.resource, BlobResourceContents) and base64.b64decode(embedded.resource.blob) == blob[:10]
    assert head.structured_content is not None
    assert (head.structured_content["has_more"], head.structured_content["next_offset"]) == (True, 10)
    assert head.structured_content["size"] == 256
    assert "UTF-8" in await call_error(client, "sandbox_read_file", sandbox_id=sid, path="data.bin", encoding="utf-8")

    owner = await sh(client, sid, "stat -c %U src/app.txt data.bin")
    assert owner["stdout"].split() == ["agent", "agent"]

    top = await call(client, "sandbox_list_files", sandbox_id=sid)
    assert {(e["path"], e["type"]) for e in top["entries"]} == {("src", "dir"), ("data.bin", "file")}
    deep = await call(client, "sandbox_list_files", sandbox_id=sid, recursive=True)
    assert {e["path"] for e in deep["entries"]} == {"src", "src/app.txt", "data.bin"}
    assert "does not exist" in await call_error(client, "sandbox_read_file", sandbox_id=sid, path="missing.txt")


async def test_list_files_stops_at_max_entries_and_says_so(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    await sh(client, sid, "touch f{1..30}")
    listing = await call(client, "sandbox_list_files", sandbox_id=sid, max_entries=5)
    assert len(listing["entries"]) == 5 and listing["truncated"] is True


async def test_exposed_port_serves_a_preview_on_loopback_even_without_network(client: Client) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    await call(client, "sandbox_write_file", sandbox_id=sid, path="site/index.html", content="<h1>preview</h1>")
    await sh(client, sid, "cd site && nohup python3 -m http.server 8000 --bind 127.0.0.1 > /tmp/http.log 2>&1 &")
    exposed = await call(client, "sandbox_expose_port", sandbox_id=sid, port=8000)
    assert exposed["url"].startswith("http://127.0.0.1:")
    assert (await call(client, "sandbox_expose_port", sandbox_id=sid, port=8000))["url"] == exposed["url"]

    body = b""
    with anyio.fail_after(20):
        while b"preview" not in body:  # the server inside may take a moment to listen
            try:
                # The link's key comes back as a cookie, which the redirect it answers with needs.
                opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
                body = await anyio.to_thread.run_sync(lambda: opener.open(exposed["url"], timeout=5).read())  # noqa: B023 - called at once, in this iteration
            except OSError:
                await anyio.sleep(0.2)
    assert b"<h1>preview</h1>" in body
    listed = (await call(client, "sandbox_list"))["sandboxes"][0]
    assert listed["ports"] == {"8000": exposed["url"]}


async def test_sandbox_list_shows_only_live_sandboxes_with_limits(client: Client) -> None:
    small = await call(client, "sandbox_create", cpus=0.5, memory_mb=256, ttl_s=600)
    other = await call(client, "sandbox_create")
    await call(client, "sandbox_destroy", sandbox_id=other["sandbox_id"])
    listed = (await call(client, "sandbox_list"))["sandboxes"]
    assert [s["sandbox_id"] for s in listed] == [small["sandbox_id"]]
    assert (listed[0]["cpus"], listed[0]["memory_mb"], listed[0]["network"]) == (0.5, 256, "none")


async def test_destroy_ends_the_sandbox_and_its_runtime_goes_back_wiped_or_is_removed(
    client: Client, settings: Settings, docker_client
) -> None:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    await sh(client, sid, "echo mine > notes.txt")
    runtime_id = sandbox_row(settings, sid).runtime_id
    await call(client, "sandbox_destroy", sandbox_id=sid)
    assert "unknown sandbox" in await call_error(client, "sandbox_exec", sandbox_id=sid, command="true")
    assert sandbox_row(settings, sid).status == "destroyed"
    with anyio.fail_after(30):
        while (state := runtime_row(settings, runtime_id).state) in ("draining", "destroying"):
            await anyio.sleep(0.1)
    assert state in ("warm", "destroyed"), state
    container_id = runtime_row(settings, runtime_id).container_id
    if state == "destroyed":
        assert docker_client.containers.list(all=True, sparse=True, filters={"id": container_id}) == []
    else:
        leftover = docker_client.containers.get(container_id).exec_run(["ls", "-A", "/workspace"], user="agent")
        assert leftover.output == b""


async def test_bad_create_arguments_are_refused_and_leave_no_container(
    client: Client, settings: Settings, docker_client
) -> None:
    assert "unknown template 'gpu'; allowed: default" in await call_error(client, "sandbox_create", template="gpu")
    internet = await call_error(client, "sandbox_create", network="internet")
    assert "internet" in internet and "allowed: none, workspace" in internet
    assert "over the cap" in await call_error(client, "sandbox_create", cpus=32)
    assert "unknown snapshot" in await call_error(client, "sandbox_create", from_snapshot="snp_0000")
    assert "DOCKYARD_" in await call_error(client, "sandbox_create", env={"DOCKYARD_EXEC_ID": "x"})
    assert "ttl_s" in await call_error(client, "sandbox_create", ttl_s=10**9)
    assert (await call(client, "sandbox_list"))["sandboxes"] == []
    # The only containers left are the pool's unclaimed ones: no refusal took a runtime.
    # sparse: the pool may remove one of these between listing and inspecting
    mine = docker_client.containers.list(
        all=True, sparse=True, filters={"label": f"dockyard.instance={instance_id(settings)}"}
    )
    states = [runtime_row(settings, c.attrs["Labels"]["dockyard.runtime"]).state for c in mine]
    assert "claimed" not in states and "draining" not in states, states
    refused = [row for row in audit_rows(settings) if row.kind == "sandbox.create"]
    assert refused and all(row.outcome == "error" for row in refused)
    assert "gpu" in json.loads(refused[0].detail)["error"]


async def test_workspace_network_connects_sandboxes_of_one_workspace(client: Client) -> None:
    server = (await call(client, "sandbox_create", network="workspace"))["sandbox_id"]
    peer = (await call(client, "sandbox_create", network="workspace"))["sandbox_id"]
    await sh(client, server, "nohup python3 -m http.server 8080 > /tmp/http.log 2>&1 &")
    host = (await sh(client, server, "hostname -i"))["stdout"].split()[0]
    probe = (
        "import time, urllib.request\n"
        "for _ in range(50):\n"
        "    try:\n"
        f"        print(urllib.request.urlopen('http://{host}:8080/', timeout=2).status); break\n"
        "    except OSError: time.sleep(0.2)\n"
    )
    assert (await sh(client, peer, "python3 -", stdin=probe))["stdout"].strip() == "200"


async def test_expired_sandbox_is_destroyed_by_the_reaper(client: Client, settings: Settings) -> None:
    sid = (await call(client, "sandbox_create", ttl_s=1))["sandbox_id"]
    with anyio.fail_after(30):
        while any(s["sandbox_id"] == sid for s in (await call(client, "sandbox_list"))["sandboxes"]):
            await anyio.sleep(0.3)
    assert sandbox_row(settings, sid).end_reason == "its time to live ran out"


async def test_symlinks_inside_workspace_are_followed_and_reported_by_their_target(client: Client) -> None:
    """Links that stay inside (relative, absolute under /workspace, through a directory, with
    '..' in the target) work; one whose '..' climbs above /workspace is refused."""
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    links = (
        "mkdir -p sub/deeper && echo hi > sub/deeper/f && ln -s sub s && ln -s /workspace/sub/deeper/f abs && "
        "ln -s deeper/../deeper/f sub/up && ln -s s/deeper down && ln -s ../../etc/passwd sub/out"
    )
    await sh(client, sid, links)
    for path in ("s/deeper/f", "abs", "sub/up"):
        content = await call(client, "sandbox_read_file", sandbox_id=sid, path=path)
        assert (content["content"], content["path"]) == ("hi\n", "sub/deeper/f"), path
    listing = await call(client, "sandbox_list_files", sandbox_id=sid, path="down")
    assert listing["path"] == "sub/deeper" and [e["path"] for e in listing["entries"]] == ["sub/deeper/f"]
    written = await call(client, "sandbox_write_file", sandbox_id=sid, path="s/new/g", content="g")
    assert written["path"] == "sub/new/g"
    assert (await sh(client, sid, "cat sub/new/g"))["stdout"] == "g"
    assert "outside /workspace" in await call_error(client, "sandbox_read_file", sandbox_id=sid, path="sub/out")
    await sh(client, sid, "ln -s . sub/here")
    assert (await call(client, "sandbox_list_files", sandbox_id=sid, path="sub/here"))["path"] == "sub"
    assert "'sub/here' is a directory" in await call_error(client, "sandbox_read_file", sandbox_id=sid, path="sub/here")
