"""Computers through the MCP client: a real Chromium in a real container opens a sandbox's
preview, reads it, fills a form, clicks, and sends back screenshots; what it may reach is
limited to the workspace's previews."""

from __future__ import annotations

import json
import re
import struct
from base64 import b64decode
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest
from mcp import Client
from sqlmodel import Session, create_engine, select

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.settings import Identity, Settings
from dockyard.runtime.substrate.store import AuditEvent
from dockyard.server.app import build_server
from tests.conftest import call, call_error, make_settings, remove_instance, sh

pytestmark = pytest.mark.anyio

APP = """<!doctype html>
<html><head><title>Greeter</title></head>
<body>
<h1 id="greeting">Hello</h1>
<p id="cookie"></p>
<p id="probe">probing</p>
<p id="uploaded">nothing attached</p>
<form id="form">
  <label>Name <input id="name"></label>
  <label>Password <input id="secret" type="password"></label>
  <label>Attachment <input id="attachment" type="file"></label>
  <button type="submit">Greet</button>
</form>
<button id="paint">Paint it red</button>
<script>
  document.getElementById("cookie").textContent = "cookie:" + document.cookie;
  document.getElementById("form").addEventListener("submit", (event) => {
    event.preventDefault();
    document.getElementById("greeting").textContent = "Hello, " + document.getElementById("name").value;
    document.cookie = "greeted=" + document.getElementById("name").value;
  });
  document.getElementById("attachment").addEventListener("change", (event) => {
    const file = event.target.files[0];
    file.text().then((text) => { document.getElementById("uploaded").textContent = `attached ${file.name}: ${text}`; });
  });
  document.getElementById("paint").addEventListener("click", () => {
    document.body.style.background = "rgb(255, 0, 0)";
    document.getElementById("greeting").textContent = "Painted";
  });
  const target = new URLSearchParams(location.search).get("probe");
  if (target) {
    fetch(target).then(() => "reached", () => "blocked").then((what) => { document.getElementById("probe").textContent = what; });
  }
</script>
</body></html>
"""


def rows(settings: Settings, model: type) -> list:
    with Session(create_engine(f"sqlite:///{settings.store_path}")) as session:
        return list(session.exec(select(model)).all())


def ref(snapshot: str, role: str, name: str) -> str:
    found = re.search(rf'{role} "{re.escape(name)}"[^\n]*\[ref=(\w+)\]', snapshot)
    assert found, f"no {role} '{name}' in:\n{snapshot}"
    return found[1]


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


async def screenshot(client: Client, computer_id: str, **extra: Any) -> tuple[int, int, bytes]:
    result = await client.call_tool("computer_screenshot", {"computer_id": computer_id, **extra})
    assert not result.is_error, result.content
    (image,) = result.content
    assert image.type == "image" and image.mime_type == "image/png"
    data = b64decode(image.data)
    return *png_size(data), data


async def computer_pool(client: Client) -> dict[str, Any]:
    (pool,) = [p for p in (await call(client, "pool_status"))["pools"] if p["template"] == "computer"]
    return pool


async def serve_app(client: Client) -> tuple[str, str]:
    """A sandbox serving the app on an exposed port: (sandbox_id, preview url)."""
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    await call(client, "sandbox_write_file", sandbox_id=sid, path="app/index.html", content=APP)
    await sh(client, sid, "cd app && (nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &)")
    url = (await call(client, "sandbox_expose_port", sandbox_id=sid, port=8000))["url"]
    with anyio.fail_after(30):
        while "Hello" not in (await sh(client, sid, "curl -s http://127.0.0.1:8000/ || true"))["stdout"]:
            await anyio.sleep(0.2)
    return sid, url


@asynccontextmanager
async def computer_server(
    tmp_path: Path, docker_client: docker.DockerClient, **overrides: Any
) -> AsyncIterator[tuple[Client, Settings]]:
    settings = make_settings(tmp_path / "data", computer_pool={"min": 1, "max": 4}, **overrides)
    try:
        async with Client(build_server(settings)) as client:
            yield client, settings
    finally:
        remove_instance(docker_client, settings)


async def test_a_computer_opens_a_preview_fills_the_form_clicks_and_shows_the_new_state(
    tmp_path: Path, computer_image: str, docker_client: docker.DockerClient
) -> None:
    async with computer_server(tmp_path, docker_client) as (client, settings):
        sid, url = await serve_app(client)
        with anyio.fail_after(60):  # the pool keeps one browser running
            while (await computer_pool(client))["warm"] < 1:
                await anyio.sleep(0.2)
        computer = await call(client, "computer_create")
        cid = computer["computer_id"]
        assert (computer["width"], computer["height"]) == (1280, 800)
        pool = await computer_pool(client)
        assert (pool["claimed"], pool["claims_warm"], pool["claims_cold"]) == (1, 1, 0)  # handed over already running
        opened = await call(client, "computer_navigate", computer_id=cid, url=url)
        assert opened["title"] == "Greeter" and opened["url"] == url.partition("?")[0]  # the preview, its key left out

        page = (await call(client, "computer_snapshot", computer_id=cid))["snapshot"]
        assert 'heading "Hello"' in page
        await call(client, "computer_type", computer_id=cid, ref=ref(page, "textbox", "Name"), text="Ada")
        await call(client, "computer_type", computer_id=cid, ref=ref(page, "textbox", "Password"), text="hunter2")
        await call(client, "computer_click", computer_id=cid, ref=ref(page, "button", "Greet"))
        assert 'heading "Hello, Ada"' in (await call(client, "computer_snapshot", computer_id=cid))["snapshot"]

        before = await screenshot(client, cid)
        await call(client, "computer_click", computer_id=cid, ref=ref(page, "button", "Paint it red"))
        after = await screenshot(client, cid)
        assert before[:2] == after[:2] == (1280, 800) and before[2] != after[2]
        assert 'heading "Painted"' in (await call(client, "computer_snapshot", computer_id=cid))["snapshot"]
        width, height, _ = await screenshot(client, cid, full_page=True)
        assert width == 1280 and height >= 200

        await call(client, "sandbox_write_file", sandbox_id=sid, path="notes/report.txt", content="all green")
        await call(
            client,
            "computer_upload",
            computer_id=cid,
            ref=ref(page, "button", "Attachment"),
            sandbox_id=sid,
            path="notes/report.txt",
        )
        await call(client, "computer_wait_for", computer_id=cid, text="attached report.txt: all green")
        await call(client, "computer_press", computer_id=cid, key="Tab")
        await call(client, "computer_scroll", computer_id=cid, dy=300)
        await call(client, "computer_destroy", computer_id=cid)
        assert "is destroyed" in await call_error(client, "computer_snapshot", computer_id=cid)

    audit = [a for a in rows(settings, AuditEvent) if a.kind.startswith("computer.")]
    kinds = [a.kind for a in audit]
    for kind in (
        "computer.create",
        "computer.navigate",
        "computer.snapshot",
        "computer.type",
        "computer.click",
        "computer.upload",
        "computer.wait_for",
        "computer.screenshot",
        "computer.press",
        "computer.scroll",
        "computer.destroy",
    ):
        assert kind in kinds, kind
    typed = [json.loads(a.detail)["text"] for a in audit if a.kind == "computer.type"]
    assert typed == ["Ada", "••••••"]  # the password never reaches the log
    assert not any("hunter2" in a.detail for a in rows(settings, AuditEvent))


async def test_parallel_computers_keep_separate_cookies_and_a_new_one_starts_clean(
    tmp_path: Path, computer_image: str, docker_client: docker.DockerClient
) -> None:
    async with computer_server(tmp_path, docker_client) as (client, _settings):
        _, url = await serve_app(client)
        first, second = [(await call(client, "computer_create"))["computer_id"] for _ in range(2)]

        async def greet(cid: str, name: str) -> None:
            await call(client, "computer_navigate", computer_id=cid, url=url)
            page = (await call(client, "computer_snapshot", computer_id=cid))["snapshot"]
            await call(
                client, "computer_type", computer_id=cid, ref=ref(page, "textbox", "Name"), text=name, submit=True
            )

        async with anyio.create_task_group() as tg:
            tg.start_soon(greet, first, "first")
            tg.start_soon(greet, second, "second")
        for cid, name in ((first, "first"), (second, "second")):
            await call(client, "computer_navigate", computer_id=cid, url=url)
            assert f"cookie:greeted={name}" in (await call(client, "computer_snapshot", computer_id=cid))["snapshot"]

        await call(client, "computer_destroy", computer_id=first)
        fresh = (await call(client, "computer_create"))["computer_id"]
        await call(client, "computer_navigate", computer_id=fresh, url=url)
        page = (await call(client, "computer_snapshot", computer_id=fresh))["snapshot"]
        assert "cookie:greeted" not in page and "cookie:" in page


@asynccontextmanager
async def host_service() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A service on this machine's loopback that records every connection it gets."""
    hits: list[bytes] = []

    async def answer(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            hits.append(await stream.receive())
            await stream.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nAccess-Control-Allow-Origin: *\r\n\r\nok")

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, answer)
        yield listener.extra(anyio.abc.SocketAttribute.local_port), hits
        tg.cancel_scope.cancel()


async def test_a_computer_reaches_only_its_workspaces_previews(
    tmp_path: Path, computer_image: str, docker_client: docker.DockerClient
) -> None:
    settings = make_settings(tmp_path / "data", computer_pool={"min": 0, "max": 4})
    mine = Identity(workspace_id="team-a", scopes=["*"])
    theirs = Identity(workspace_id="team-b", scopes=["*"])
    try:
        async with Engine.open(settings) as engine, host_service() as (host_port, hits):
            own = await engine.sandboxes.create(mine)
            other = await engine.sandboxes.create(theirs)
            for sandbox in (own, other):
                await engine.sandboxes.write_file(
                    mine if sandbox is own else theirs, sandbox.sandbox_id, "index.html", APP, "utf-8"
                )
                await engine.sandboxes.exec(
                    mine if sandbox is own else theirs,
                    sandbox.sandbox_id,
                    "(nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &)",
                )
            own_url = (await engine.sandboxes.expose_port(mine, own.sandbox_id, 8000)).url
            other_url = (await engine.sandboxes.expose_port(theirs, other.sandbox_id, 8000)).url
            await anyio.sleep(1)
            computer = (await engine.computers.create(mine)).computer_id

            refused = {
                "file:///etc/passwd": "blocked URL scheme 'file'",
                "chrome://settings": "blocked URL scheme 'chrome'",
                "javascript:alert(1)": "blocked URL scheme 'javascript'",
                "http://169.254.169.254/latest/meta-data/": "cannot reach 169.254.169.254",
                f"http://127.0.0.1:{host_port}/": f"cannot reach 127.0.0.1:{host_port}",
                other_url: "cannot reach",
                "http://example.com/": "cannot reach example.com",
            }
            for url, why in refused.items():
                with pytest.raises(Exception) as caught:
                    await engine.pages.navigate(mine, computer, url)
                assert why in str(caught.value), (url, caught.value)

            # A page of the workspace's own preview cannot reach past it either: its requests to
            # this machine's service and to another workspace's preview are refused in flight.
            for target in (f"http://127.0.0.1:{host_port}/", other_url):
                await engine.pages.navigate(mine, computer, f"{own_url}&probe={target}")  # own_url has a query: its key
                await engine.pages.wait_for(mine, computer, "blocked", 10)
            assert hits == []
            # Another workspace cannot drive this computer at all.
            with pytest.raises(Exception, match="unknown computer"):
                await engine.pages.snapshot(theirs, computer)
            denied = [a for a in await engine.audit.query(workspace_id="team-b") if a.kind == "computer.snapshot"]
            assert [a.outcome for a in denied] == ["denied"]
    finally:
        remove_instance(docker_client, settings)


async def test_bad_computer_requests_get_clear_errors(
    tmp_path: Path, computer_image: str, docker_client: docker.DockerClient
) -> None:
    async with computer_server(tmp_path, docker_client, quotas={"workspace_computers": 1}) as (client, _settings):
        sid, url = await serve_app(client)
        assert "unknown computer" in await call_error(client, "computer_snapshot", computer_id="cmp_nope")
        assert "unknown computer template" in await call_error(client, "computer_create", template="default")
        assert "use computer_create" in await call_error(client, "sandbox_create", template="computer")
        cid = (await call(client, "computer_create"))["computer_id"]
        assert "quota workspace_computers reached: 1 of 1" in await call_error(client, "computer_create")
        await call(client, "computer_navigate", computer_id=cid, url=url)
        page = (await call(client, "computer_snapshot", computer_id=cid))["snapshot"]
        paint = ref(page, "button", "Paint it red")
        await call(client, "computer_navigate", computer_id=cid, url="about:blank")
        assert "not on the page any more" in await call_error(client, "computer_click", computer_id=cid, ref=paint)
        assert "is not an element ref" in await call_error(
            client, "computer_click", computer_id=cid, ref="button#paint"
        )
        closed = (await call(client, "sandbox_expose_port", sandbox_id=sid, port=9))["url"]  # nothing listens there
        assert "could not load" in await call_error(client, "computer_navigate", computer_id=cid, url=closed)
        assert "could not press" in await call_error(client, "computer_press", computer_id=cid, key="NoSuchKey")
        assert "did not show" in await call_error(
            client, "computer_wait_for", computer_id=cid, text="never there", timeout_s=1
        )
