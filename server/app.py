"""Wires the layers: builds the MCPServer, registers the tools, owns the engine's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from importlib.metadata import version
from typing import Any

from mcp.server import ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.subscriptions import ResourceUpdated
from mcp.types import CallToolResult, DiscoverResult, InputRequiredResult, RequestParams, Tool
from mcp.types.version import MODERN_PROTOCOL_VERSIONS

from dockyard.runtime.engine import Engine
from dockyard.runtime.substrate.actions import Toolset
from dockyard.runtime.substrate.settings import Settings
from dockyard.runtime.work.teams.access import INBOX
from dockyard.server.bridge import serve_bridge
from dockyard.server.bus import WorkspaceBus
from dockyard.server.eventloop import without_cancelled_reader_reports
from dockyard.server.subscribe import serve_subscriptions
from dockyard.server.transports import BearerTokens
from dockyard.tools import audit, computer, discovery, dispatch, pool, resources, sandbox, team, token
from dockyard.tools._context import caller_as
from dockyard.tools._toolbox import Toolbox
from dockyard.tools.resources import watched
from dockyard.tools.tasks import TasksExtension

__all__ = ["DockyardServer", "build_server"]

# What the server tells a client's model, one paragraph per toolset it offers.
INSTRUCTIONS = {
    Toolset.SANDBOX: """\
dockyard gives you isolated Linux sandboxes (Docker containers, no network by default).
Create one with sandbox_create, run commands with sandbox_exec, move files with
sandbox_write_file / sandbox_read_file, and destroy it with sandbox_destroy when done.
Paths are relative to /workspace. Snapshots (sandbox_snapshot) can seed new sandboxes.
Sandboxes come from a warm pool, so creating one is fast; snapshot_list finds your
snapshots. Programs inside a sandbox call these tools through dockyard-bridge (MCP on stdio)
or dockyard-call.""",
    Toolset.DISPATCH: """\
To hand a task off, dispatch it (remote, local, team modes) and collect it with await_dispatch;
dispatch_list finds the dispatches you started before.""",
    Toolset.TEAM: """\
For several agents working together, team_create a team, team_spawn members, and follow it
with team_tasks; members message each other and claim tasks from the shared list; team_list
finds your teams.""",
    Toolset.COMPUTER: """\
To look at what a sandbox serves, expose its port and open the URL in a computer (a headless
browser: computer_create, computer_navigate, computer_snapshot, computer_click, ...).""",
    Toolset.ADMIN: """\
capabilities shows the modes, runners, templates and quotas open to you; pool_status shows the
warm pools' capacity; tokens and the audit log have tools of their own.""",
}


class DockyardServer(MCPServer[Engine]):
    """The SDK's server, with its tools kept in a `Toolbox`: listed per caller, checked strictly."""

    def __init__(self, toolbox: Toolbox, **options: Any) -> None:
        super().__init__(**options)
        self.toolbox = toolbox

    async def list_tools(self) -> list[Tool]:
        """The tools of the offered toolsets that the caller's scopes allow."""
        return self.toolbox.listed(caller_as(self.toolbox.settings.operator))

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Engine, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        return await self.toolbox.call(name, arguments, context or Context(mcp_server=self))

    def add_tool(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("add a dockyard tool with Toolbox.add, which declares its toolset, title and scopes")


def _honest_capabilities(server: MCPServer[Engine]) -> None:
    """Advertise no prompts (there are none) and a tool list that never changes within a session:
    a session's caller, its scopes and the offered toolsets are fixed when it starts."""
    lowlevel = server._lowlevel_server  # noqa: SLF001 - the SDK derives capabilities from its handlers
    for method in ("prompts/list", "prompts/get"):
        lowlevel._request_handlers.pop(method, None)  # noqa: SLF001 - the SDK has no way to unregister

    async def discover(ctx: ServerRequestContext[Engine, Any], params: RequestParams | None) -> DiscoverResult:
        capabilities = lowlevel.get_capabilities(protocol_version=ctx.protocol_version)
        if capabilities.tools is not None:
            tools = capabilities.tools.model_copy(update={"list_changed": False})
            capabilities = capabilities.model_copy(update={"tools": tools})
        return DiscoverResult(
            supported_versions=list(MODERN_PROTOCOL_VERSIONS),
            capabilities=capabilities,
            instructions=lowlevel.instructions,
        )

    lowlevel.add_request_handler("server/discover", RequestParams, discover)


def build_server(
    settings: Settings,
    *,
    bearer: BearerTokens | None = None,
    admin_key: str | None = None,
    toolsets: Sequence[Toolset] | None = None,
) -> DockyardServer:
    """An MCP server whose lifespan opens one engine for these settings.

    For the streamable HTTP transport, `bearer` is the verifier its gate asks (it is handed
    the engine's tokens once the engine is open); `admin_key` is the key that mints the first
    tokens. `toolsets` replaces the transport's toolsets from the settings.
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

    offered = toolsets if toolsets is not None else settings.toolsets.http if bearer else settings.toolsets.stdio
    tools = Toolbox(settings, offered)
    server = DockyardServer(
        tools,
        name="dockyard",
        title="dockyard",
        instructions="\n".join(text for toolset, text in INSTRUCTIONS.items() if toolset in tools.offered),
        version=version("dockyard"),
        lifespan=lifespan,
        log_level=settings.log_level,
        subscriptions=bus,
        extensions=[TasksExtension()],
    )
    _honest_capabilities(server)
    for family in (sandbox, pool, token, audit, dispatch, team, computer, discovery):
        family.register(tools)
    sandbox.register_resources(server)
    dispatch.register_resources(server)
    resources.register(server)
    serve_subscriptions(server, bus)
    return server
