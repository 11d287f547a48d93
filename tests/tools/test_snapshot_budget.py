"""computer_snapshot within a budget: a long page is read in parts that say where they were cut,
and one element's subtree can be read alone."""

from __future__ import annotations

import json
import re
from pathlib import Path

import anyio
import docker
import pytest
from mcp import Client

from tests.conftest import call, call_error, sh
from tests.tools.test_computers import computer_server

pytestmark = pytest.mark.anyio

BUDGET = 16000

LONG = (
    "<!doctype html><html><head><title>Long</title></head><body>"
    + "".join(f'<p>paragraph {n} with "quoted" words</p>' for n in range(3000))
    + '<nav id="menu"><h2>Menu</h2><ul>'
    + "".join(f'<li><a href="#{n}">item {n}</a></li>' for n in range(5))
    + "</ul></nav><p>THE END</p></body></html>"
)


async def serve_long(client: Client) -> str:
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    await call(client, "sandbox_write_file", sandbox_id=sid, path="app/index.html", content=LONG)
    await sh(client, sid, "cd app && (nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &)")
    url = (await call(client, "sandbox_expose_port", sandbox_id=sid, port=8000))["url"]
    with anyio.fail_after(30):
        while "THE END" not in (await sh(client, sid, "curl -s http://127.0.0.1:8000/ || true"))["stdout"]:
            await anyio.sleep(0.2)
    return url


async def test_a_long_page_snapshot_is_cut_within_the_budget_pages_on_and_scopes_to_a_ref(
    tmp_path: Path, computer_image: str, docker_client: docker.DockerClient
) -> None:
    async with computer_server(tmp_path, docker_client, computers={"snapshot_cap_chars": 400_000}) as (client, _):
        url = await serve_long(client)
        cid = (await call(client, "computer_create"))["computer_id"]
        await call(client, "computer_navigate", computer_id=cid, url=url)

        first = await call(client, "computer_snapshot", computer_id=cid)
        assert len(json.dumps(first, ensure_ascii=False)) <= BUDGET + 1000
        assert first["has_more"] and first["offset"] == 0 and first["snapshot_chars"] > 100_000
        assert f"pass offset={first['next_offset']}]" in first["snapshot"]
        assert "paragraph 0 " in first["snapshot"] and "THE END" not in first["snapshot"]

        whole, offset, parts = "", 0, 0
        while True:
            part = await call(client, "computer_snapshot", computer_id=cid, offset=offset, budget=8000)
            assert len(json.dumps(part, ensure_ascii=False)) <= 8000 + 1000
            whole += part["snapshot"].split("\n[... snapshot cut:")[0]
            parts += 1
            if not part["has_more"]:
                break
            offset = part["next_offset"]
        assert parts > 10 and len(whole) == first["snapshot_chars"] and "THE END" in whole
        assert all(f"paragraph {n} " in whole for n in (0, 1500, 2999))

        menu = re.search(r"navigation[^\n]*\[ref=(\w+)\]", whole)
        assert menu, whole[-2000:]
        scoped = await call(client, "computer_snapshot", computer_id=cid, ref=menu[1])
        assert "item 4" in scoped["snapshot"] and "paragraph" not in scoped["snapshot"]
        assert scoped["has_more"] is False and scoped["next_offset"] is None

        assert "not an element ref" in await call_error(client, "computer_snapshot", computer_id=cid, ref="../x")
        past = await call_error(client, "computer_snapshot", computer_id=cid, offset=10_000_000)
        assert "past the snapshot" in past
