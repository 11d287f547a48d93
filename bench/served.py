"""The dockyard server as a user runs it: `dockyard serve` on stdio, driven by the official MCP client."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import anyio.abc
import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult

from bench.run import Run

__all__ = ["EVERY_TOOLSET", "Served", "ToolCallError", "child_pid", "serve", "serve_http", "stdio", "timed"]

T = TypeVar("T")
DOCKYARD = Path(sys.executable).parent / "dockyard"
Mode = Literal["legacy", "auto"]
EVERY_TOOLSET = "sandbox,computer,dispatch,team,admin"
_PASSED_ON = ("DOCKYARD_IMAGES__PREFIX", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CERT_PATH", "DOCKER_TLS_VERIFY")


class ToolCallError(RuntimeError):
    """Raised when a tool call the benchmark depends on comes back as an error."""


async def timed(samples: list[float], call: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Await `call(*args, **kwargs)` and append how long it took, in milliseconds, to `samples`."""
    started = time.perf_counter()
    result = await call(*args, **kwargs)
    samples.append((time.perf_counter() - started) * 1000)
    return result


def child_pid(argv: list[str]) -> int:
    """The pid of this process's child whose command line ends with `argv`."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:  # it ended meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and cmdline[-len(argv) :] == argv:
            return int(entry.name)
    raise LookupError(f"no child process runs {' '.join(argv)}")


@asynccontextmanager
async def stdio(params: StdioServerParameters, log: Path, mode: Mode) -> AsyncIterator[tuple[Client, int]]:
    """A client session with a server started over stdio (its stderr in `log`), and the server's pid."""
    with log.open("w") as errlog:
        try:
            async with Client(stdio_client(params, errlog=errlog), mode=mode) as client:
                yield client, child_pid([params.command, *params.args])
        except Exception:
            errlog.flush()
            tail = log.read_text(errors="replace").splitlines()[-20:]
            print(
                f"{params.command} {' '.join(params.args)} said, before it failed:", *tail, sep="\n  ", file=sys.stderr
            )
            raise


@dataclass
class Served:
    """A running `dockyard serve` with its client session."""

    client: Client
    pid: int
    data_dir: Path

    @property
    def instance(self) -> str:
        """The server's instance id: the `dockyard.instance` label on everything it starts."""
        return (self.data_dir / "instance-id").read_text().strip()

    async def call(self, tool: str, **arguments: Any) -> dict[str, Any]:
        """Call a tool and return its structured result; a tool error raises."""
        return checked(tool, await self.client.call_tool(tool, arguments))

    async def pool(self, template: str = "default") -> dict[str, Any]:
        """One template's pool, as `pool_status` reports it."""
        return next(p for p in (await self.call("pool_status"))["pools"] if p["template"] == template)

    async def settle(
        self, is_enough: Callable[[int], bool], timeout_s: float = 180, template: str = "default"
    ) -> dict[str, Any]:
        """Poll until the warm count satisfies `is_enough` and nothing is starting or draining."""
        with anyio.fail_after(timeout_s):
            while True:
                pool = await self.pool(template)
                if is_enough(pool["warm"]) and pool["provisioning"] == pool["draining"] == 0:
                    return pool
                await anyio.sleep(0.05)

    def container_of(self, run: Run, sandbox_id: str) -> str:
        """The id of the container behind a sandbox: its runtime from the store, then that runtime's labels."""
        store = sqlite3.connect(f"file:{self.data_dir / 'dockyard.db'}?mode=ro", uri=True)
        try:
            row = store.execute("SELECT runtime_id FROM sandbox WHERE id = ?", (sandbox_id,)).fetchone()
        finally:
            store.close()
        if row is None:
            raise LookupError(f"the store has no sandbox {sandbox_id}")
        labels = [f"dockyard.instance={self.instance}", f"dockyard.runtime={row[0]}"]
        found = run.docker.api.containers(filters={"label": labels})
        if len(found) != 1:
            raise LookupError(f"{len(found)} running containers carry {' and '.join(labels)}")
        return str(found[0]["Id"])

    def containers(self, run: Run) -> list[str]:
        """The ids of the running containers this server started."""
        return [c["Id"] for c in run.docker.api.containers(filters={"label": f"dockyard.instance={self.instance}"})]


def checked(tool: str, result: CallToolResult) -> dict[str, Any]:
    content: dict[str, Any] | None = result.structured_content
    if result.is_error or content is None:
        text = " ".join(getattr(block, "text", "") for block in result.content)
        raise ToolCallError(f"{tool} failed: {text or result.content}")
    return content


@asynccontextmanager
async def serve(
    run: Run,
    name: str,
    *,
    pool_min: int,
    pool_max: int,
    mode: Mode = "auto",
    computers: tuple[int, int] = (0, 1),
    toolsets: str | None = EVERY_TOOLSET,
) -> AsyncIterator[Served]:
    """`dockyard serve` with a fresh data dir, the default template's pool at (pool_min, pool_max)
    and the computer pool at `computers` (none warm unless a section asks: a browser would
    weigh on every other figure).

    The server's containers are removed on the way out: warm runtimes outlive their server by design.
    `mode` is the client's protocol negotiation: 'auto' (the SDK's default) takes the newest
    protocol both sides speak; 'legacy' is the initialize handshake (2025-11-25), which has ping.
    `toolsets` is `serve --toolsets` (every one by default: the sections read the pools and drive
    computers); None serves the shipped default.
    """
    data_dir = run.data_dir(name)
    env = {key: os.environ[key] for key in _PASSED_ON if key in os.environ}
    env |= {
        "DOCKYARD_DATA_DIR": str(data_dir),
        "POOL_MIN": str(pool_min),
        "POOL_MAX": str(pool_max),
        "POOL_AUTOSCALE_ENABLED": "false",
        "DOCKYARD_TEMPLATES__COMPUTER__POOL__MIN": str(computers[0]),
        "DOCKYARD_TEMPLATES__COMPUTER__POOL__MAX": str(computers[1]),
        # One tenant measures the engine: its whole pool, and no rate limit on its dispatches
        # (the quotas that keep tenants apart would otherwise be what is measured).
        "DOCKYARD_QUOTAS__WORKSPACE_POOL_SHARE": "1.0",
        "DOCKYARD_QUOTAS__DISPATCHES_PER_MINUTE": "0",
    }
    args = ["serve"] if toolsets is None else ["serve", "--toolsets", toolsets]
    params = StdioServerParameters(command=str(DOCKYARD), args=args, env=env)
    try:
        async with stdio(params, run.root / f"{name}.log", mode) as (client, pid):
            yield Served(client, pid, data_dir)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(run.remove_instance, data_dir)


@asynccontextmanager
async def serve_http(run: Run, name: str, scopes: list[str]) -> AsyncIterator[Client]:
    """`dockyard serve --http` on a free loopback port with a fresh data dir (no warm runtimes),
    and a client holding a token minted for it with `dockyard token mint`."""
    data_dir = run.data_dir(name)
    env = {key: os.environ[key] for key in (*_PASSED_ON, "PATH", "HOME") if key in os.environ}
    env |= {"DOCKYARD_DATA_DIR": str(data_dir), "POOL_MIN": "0", "DOCKYARD_TEMPLATES__COMPUTER__POOL__MIN": "0"}
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    await listener.aclose()
    url = f"http://127.0.0.1:{port}"
    with (run.root / f"{name}.log").open("wb") as log:
        process = await anyio.open_process([str(DOCKYARD), "serve", "--http", f"127.0.0.1:{port}"], env=env, stderr=log)
    try:
        async with httpx2.AsyncClient(timeout=30) as probe:
            with anyio.fail_after(60):
                while True:
                    try:
                        if (await probe.get(f"{url}/healthz")).status_code == 200:
                            break
                    except httpx2.TransportError:
                        pass
                    await anyio.sleep(0.1)
        argv = [str(DOCKYARD), "token", "mint", "--workspace", "bench", "--json"]
        for scope in scopes:
            argv += ["--scope", scope]
        minted = await anyio.run_process(argv, env=env)
        token = json.loads(minted.stdout)["token"]
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
            async with Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
                yield client
    finally:
        with anyio.CancelScope(shield=True):
            process.terminate()
            with anyio.move_on_after(15):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
            await anyio.to_thread.run_sync(run.remove_instance, data_dir)
