"""Wires the layers: builds the MCPServer, registers the tools, owns the engine's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from importlib.metadata import version

from mcp.server.mcpserver import MCPServer
from mcp.shared.subscriptions import ResourceUpdated

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.work.teams.access import INBOX
from dockyard.server.bridge import serve_bridge
from dockyard.server.bus import WorkspaceBus
from dockyard.server.eventloop import without_cancelled_reader_reports
from dockyard.server.subscribe import serve_subscriptions
from dockyard.server.transports import BearerTokens
from dockyard.tools import audit, computer, discovery, dispatch, pool, resources, sandbox, team, token
from dockyard.tools.resources import watched

__all__ = ["build_server"]

INSTRUCTIONS = """\
dockyard gives you isolated Linux sandboxes (Docker containers, no network by default).
Create one with sandbox_create, run commands with sandbox_exec, move files with
sandbox_write_file / sandbox_read_file, and destroy it with sandbox_destroy when done.
Paths are relative to /workspace. Snapshots (sandbox_snapshot) can seed new sandboxes.
Sandboxes come from a warm pool, so creating one is fast; pool_status shows its capacity.
To hand a task off, dispatch it (remote, local, team modes) and collect it with await_dispatch.
For several agents working together, team_create a team, team_spawn members, and follow it
with team_tasks; members message each other and claim tasks from the shared list.
To look at what a sandbox serves, expose its port and open the URL in a computer (a headless
browser: computer_create, computer_navigate, computer_snapshot, computer_click, ...).
capabilities shows the modes, runners, templates and quotas open to you; dispatch_list,
team_list and snapshot_list find what you started before. Programs inside a sandbox call
these tools through dockyard-bridge (MCP on stdio) or dockyard-call, with no network."""


def build_server(
    settings: Settings, *, bearer: BearerTokens | None = None, admin_key: str | None = None
) -> MCPServer[Engine]:
    """An MCP server whose lifespan opens one engine for these settings.

    For the streamable HTTP transport, `bearer` is the verifier its gate asks (it is handed
    the engine's tokens once the engine is open); `admin_key` is the key that mints the first
    tokens.
    """
    bus = WorkspaceBus(settings.operator)

    async def changed(uri: str, workspace_id: str) -> None:
        target = watched(uri)
        assert target is not None, uri
        await bus.publish_to(workspace_id, target.may_hear, ResourceUpdated(uri=uri))

    async def dispatch_changed(dispatch_id: str, workspace_id: str) -> None:
        await changed(resources.DISPATCH.format(dispatch_id), workspace_id)

    async def team_changed(team_id: str, workspace_id: str, part: str) -> None:
        await changed((resources.INBOX if part == INBOX else resources.TEAM).format(team_id), workspace_id)

    async def sandbox_changed(sandbox_id: str, workspace_id: str) -> None:
        await changed(resources.SANDBOX.format(sandbox_id), workspace_id)

    @asynccontextmanager
    async def lifespan(_: MCPServer[Engine]) -> AsyncIterator[Engine]:
        with without_cancelled_reader_reports():
            async with Engine.open(settings) as engine, bus.serving():
                engine.supervisors.on_bridge = partial(serve_bridge, server, engine)
                engine.dispatches.on_change = dispatch_changed
                engine.teams.on_change = team_changed
                engine.sandboxes.on_change = sandbox_changed
                engine.tokens.on_revoke = bus.revoked
                if admin_key:
                    engine.tokens.set_admin_key(admin_key)
                if bearer is not None:
                    bearer.tokens = engine.tokens
                yield engine

    server: MCPServer[Engine] = MCPServer(
        "dockyard",
        title="dockyard",
        instructions=INSTRUCTIONS,
        version=version("dockyard"),
        lifespan=lifespan,
        log_level=settings.log_level,
        subscriptions=bus,
    )
    sandbox.register(server)
    pool.register(server)
    token.register(server)
    audit.register(server)
    dispatch.register(server)
    team.register(server)
    computer.register(server)
    discovery.register(server)
    resources.register(server)
    serve_subscriptions(server, bus)
    return server
