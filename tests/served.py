"""A real `dockyard serve --http` on loopback, for tests that play clients with real tokens.

`serve(data_dir, env)` starts one and returns it; `connect(served, token)` opens the official
MCP client over streamable HTTP with a bearer token; `mint` asks the admin key for a token.
The `served` and `serve_http` fixtures in conftest stop the process and remove its containers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import call

__all__ = ["DOCKYARD", "Served", "connect", "mint", "serve", "stop"]

DOCKYARD = str(Path(sys.executable).parent / "dockyard")


@dataclass
class Served:
    """One running `dockyard serve --http` and what a test needs to reach it."""

    url: str
    data_dir: Path
    admin_key: str
    stderr: str
    process: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(data_dir: Path, env: dict[str, str] | None = None, port: int | None = None) -> Served:
    """Start `dockyard serve --http` on a free loopback port and wait until /healthz answers.

    `env` adds DOCKYARD_* settings (the pool keeps one warm sandbox and no computer unless it
    says otherwise)."""
    port = port or _free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir.parent / f"serve-{port}.log"
    extra = {"POOL_MIN": "1", "DOCKYARD_TEMPLATES__COMPUTER__POOL__MIN": "0", **(env or {})}
    full = {**os.environ, "DOCKYARD_DATA_DIR": str(data_dir), **extra}
    full.pop("DOCKYARD_ADMIN_KEY", None)
    with log.open("ab") as sink:
        process = subprocess.Popen([DOCKYARD, "serve", "--http", f"127.0.0.1:{port}"], env=full, stderr=sink)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx2.get(f"{url}/healthz", timeout=2).status_code == 200:
                key = (data_dir / "admin-key").read_text().strip()
                return Served(url, data_dir, key, log.read_text(), process, log, extra)
        except httpx2.TransportError:
            pass
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    process.wait(10)
    raise AssertionError(f"dockyard serve --http did not come up: {log.read_text()[-2000:]}")


def stop(served: Served, kill: bool = False) -> None:
    """End the server: SIGTERM (a clean stop) or SIGKILL (a crash)."""
    if served.process.poll() is not None:
        return
    served.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        served.process.wait(20)
    except subprocess.TimeoutExpired:
        served.process.kill()
        served.process.wait(10)


@asynccontextmanager
async def connect(served: Served, token: str) -> AsyncIterator[Client]:
    """The official MCP client over streamable HTTP, presenting `token`."""
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
        async with Client(streamable_http_client(f"{served.url}/mcp", http_client=http)) as client:
            yield client


async def mint(served: Served, **request: Any) -> dict[str, Any]:
    """A token minted with the admin key (say workspace_id)."""
    async with connect(served, served.admin_key) as admin:
        return await call(admin, "token_mint", **request)
