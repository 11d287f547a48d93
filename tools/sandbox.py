"""Sandbox tools: hardened Docker containers with a persistent /workspace."""

from __future__ import annotations

from base64 import b64encode
from typing import Annotated, Literal
from urllib.parse import quote

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError
from mcp.types import BlobResourceContents, CallToolResult, ContentBlock, EmbeddedResource, TextContent
from pydantic import BaseModel, Field

from dockyard.runtime.runtimes.outputs import EXEC_OUTPUT_URI
from dockyard.runtime.substrate.actions import Action, Scope, Toolset
from dockyard.runtime.substrate.errors import DockyardError, NotFoundError
from dockyard.runtime.substrate.listings import DEFAULT_LIMIT, MAX_LIMIT, SnapshotPage
from dockyard.runtime.substrate.models import (
    ExecResult,
    FileListing,
    FileReadResult,
    FileWritten,
    PortInfo,
    SandboxInfo,
    SnapshotInfo,
)
from dockyard.tools._annotations import ADDITIVE, DESTRUCTIVE, DESTRUCTIVE_IDEMPOTENT, IDEMPOTENT, READ_ONLY, Reach
from dockyard.tools._context import EngineContext, any_of, authorized, engine
from dockyard.tools._errors import tool_errors
from dockyard.tools._progress import build_notes, live
from dockyard.tools._toolbox import Toolbox

__all__ = ["register"]

SandboxId = Annotated[
    str, Field(description="A sandbox id (sbx_...) from sandbox_create or sandbox_list.", max_length=64)
]
SNAPSHOT_LIST_TITLE = "List snapshots"
_SANDBOX_SCOPES = [Scope.SANDBOX_CREATE, Scope.SANDBOX_EXEC, Scope.SANDBOX_FILES]
WorkspacePath = Annotated[
    str, Field(description="A path relative to /workspace, or an absolute path under /workspace.", max_length=4096)
]


class SandboxList(BaseModel):
    """The caller's live sandboxes."""

    sandboxes: list[SandboxInfo]


class Destroyed(BaseModel):
    """A sandbox that no longer exists."""

    sandbox_id: str
    destroyed: bool = True


class SnapshotDeleted(BaseModel):
    """A snapshot that no longer exists; its space is the workspace's again."""

    snapshot_id: str
    deleted: bool = True


@tool_errors
async def sandbox_create(
    ctx: EngineContext,
    template: Annotated[str | None, Field(description="Template name from config; default 'default'.")] = None,
    network: Annotated[
        Literal["none", "workspace", "internet"] | None,
        Field(
            description="'none' (default): no network; 'workspace': only your other runtimes; 'internet' if allowed."
        ),
    ] = None,
    cpus: Annotated[float | None, Field(gt=0, le=64, description="CPU cores; default from the template.")] = None,
    memory_mb: Annotated[int | None, Field(ge=64, le=65536, description="Memory (and swap) limit in MiB.")] = None,
    env: Annotated[dict[str, str] | None, Field(description="Environment variables for every command.")] = None,
    ttl_s: Annotated[int | None, Field(ge=1, description="Destroy automatically after this many seconds.")] = None,
    from_snapshot: Annotated[
        str | None, Field(description="Start from a snapshot id (snp_...), from sandbox_snapshot or snapshot_list.")
    ] = None,
) -> SandboxInfo:
    """Create an isolated Linux sandbox (Debian with python3, git, curl and build tools) and return its id.

    Commands run as a non-root user in /workspace, which persists for the sandbox's life; the
    rest of the filesystem is read-only apart from /tmp and the home directory. There is no
    network unless you ask for one. Pass from_snapshot to start from a saved sandbox. Destroy
    the sandbox with sandbox_destroy when you are done; it also expires after ttl_s.
    capabilities lists the templates and their limits. Programs inside the sandbox can call
    dockyard's tools with dockyard-bridge (MCP on stdio) or dockyard-call, acting as the
    sandbox's own token.
    """
    who = await authorized(ctx, Scope.SANDBOX_CREATE, Action.SANDBOX_CREATE)
    async with live(ctx) as progress:  # heartbeats while it waits for an image build or the pool
        return await engine(ctx).sandboxes.create(
            who,
            template=template,
            network=network,
            cpus=cpus,
            memory_mb=memory_mb,
            env=env,
            ttl_s=ttl_s,
            from_snapshot=from_snapshot,
            notify=build_notes(progress),
        )


@tool_errors
async def sandbox_exec(
    ctx: EngineContext,
    sandbox_id: SandboxId,
    command: Annotated[str, Field(min_length=1, max_length=100_000, description="A bash command line.")],
    cwd: Annotated[str | None, Field(description="Working directory under /workspace.")] = None,
    env: Annotated[dict[str, str] | None, Field(description="Extra environment variables.")] = None,
    timeout_s: Annotated[
        int | None, Field(gt=0, description="Kill the command after this many seconds (default 60).")
    ] = None,
    stdin: Annotated[str | None, Field(description="Text fed to the command's standard input.")] = None,
) -> ExecResult:
    """Run a bash command in a sandbox and return its exit code, stdout and stderr.

    While it runs, its output streams as progress notifications (if you pass a progress token):
    each line within 50 ms, stdout and stderr in order, stderr lines marked `[stderr] `; a quiet
    command sends a `[dockyard] running for N s` heartbeat every few seconds with the tail of
    its output. The result keeps the head and the tail of each stream within the result budget
    (about 16 KB), with a marker saying how many bytes were left out in the middle; a cut
    stream's whole output (up to the 64 KiB cap per stream, its head and tail) is the resource
    named in stdout_uri / stderr_uri, kept for the sandbox's last 20 commands. For more,
    redirect output to a file and page it with sandbox_read_file. At timeout_s the command and
    the processes it started are killed, and the result says timed_out with exit code 124.
    Start long-lived servers with nohup and redirected output (`nohup cmd > log 2>&1 &`) so the
    call returns.
    """
    who = await authorized(ctx, Scope.SANDBOX_EXEC, Action.SANDBOX_EXEC, sandbox_id)
    async with live(ctx) as progress:
        return await engine(ctx).sandboxes.exec(
            who,
            sandbox_id,
            command,
            cwd=cwd,
            env=env,
            timeout_s=timeout_s,
            stdin=stdin,
            on_output=progress.output,
            fit=True,
        )


async def exec_output(sandbox_id: str, n: int, stream: Literal["stdout", "stderr"], ctx: EngineContext) -> str:
    """All of one stream of a command run with sandbox_exec (up to the output cap), as the
    result's stdout_uri / stderr_uri name it. A sandbox keeps its last 20; they go with it."""
    try:
        who = await any_of(ctx, [Scope.SANDBOX_EXEC, Scope.SANDBOX_FILES], Action.SANDBOX_READ_OUTPUT)
        return await engine(ctx).sandboxes.read_output(who, sandbox_id, n, stream)
    except NotFoundError as exc:
        raise ResourceNotFoundError(str(exc)) from exc
    except DockyardError as exc:
        raise ResourceError(str(exc)) from exc


@tool_errors
async def sandbox_write_file(
    ctx: EngineContext,
    sandbox_id: SandboxId,
    path: WorkspacePath,
    content: Annotated[str, Field(description="The file's content: text, or base64 when encoding is 'base64'.")],
    encoding: Annotated[Literal["utf-8", "base64"], Field(description="How content is encoded.")] = "utf-8",
) -> FileWritten:
    """Write a file under /workspace in a sandbox, creating parent directories and replacing any existing file.

    Use encoding='base64' for binary content. Paths that leave /workspace (through '..', an
    absolute path elsewhere or a symlink) are refused, and so is content over the size cap.
    """
    who = await authorized(ctx, Scope.SANDBOX_FILES, Action.SANDBOX_WRITE_FILE, sandbox_id)
    return await engine(ctx).sandboxes.write_file(who, sandbox_id, path, content, encoding)


@tool_errors
async def sandbox_read_file(
    ctx: EngineContext,
    sandbox_id: SandboxId,
    path: WorkspacePath,
    offset: Annotated[int, Field(ge=0, description="Start at this byte (a page's next_offset).")] = 0,
    length: Annotated[
        int | None, Field(gt=0, description="Read at most this many bytes (default: what fits the result budget).")
    ] = None,
    encoding: Annotated[
        Literal["utf-8", "base64"] | None,
        Field(
            description="Default: text if the page is UTF-8, else binary. 'utf-8' refuses binary; 'base64' forces binary."
        ),
    ] = None,
) -> Annotated[CallToolResult, FileReadResult]:
    """Read a page of a file under /workspace in a sandbox.

    A page fits the result budget (about 16 KB): the result gives the file's size, whether more
    remains, and next_offset to read on with. Text comes back in content. Binary files are not
    sent as base64 text: the page's bytes (about 11 KB at most) come as an embedded resource
    (a blob) of the result, and content is empty.
    """
    who = await authorized(ctx, Scope.SANDBOX_FILES, Action.SANDBOX_READ_FILE, sandbox_id)
    page, data = await engine(ctx).sandboxes.read_page(who, sandbox_id, path, encoding, offset, length)
    blocks: list[ContentBlock] = [TextContent(text=page.model_dump_json())]
    if page.encoding == "binary":
        uri = f"dockyard://sandboxes/{sandbox_id}/files/{quote(page.path)}?offset={page.offset}&length={page.length}"
        blob = BlobResourceContents(uri=uri, mime_type="application/octet-stream", blob=b64encode(data).decode())
        blocks.append(EmbeddedResource(resource=blob))
    return CallToolResult(content=blocks, structured_content=page.model_dump(mode="json"))


@tool_errors
async def sandbox_list_files(
    ctx: EngineContext,
    sandbox_id: SandboxId,
    path: WorkspacePath = ".",
    recursive: Annotated[bool, Field(description="Walk subdirectories too.")] = False,
    max_entries: Annotated[int | None, Field(gt=0, description="Stop after this many entries (cap 1000).")] = None,
) -> FileListing:
    """List the files and directories under a path of a sandbox's /workspace, with types, sizes and times.

    The listing stops at max_entries or at the result budget (about 16 KB), and then says
    truncated: list a subdirectory to see more. Symlinks are listed, not entered. A name that is not printable UTF-8 is shown with \\xNN
    escapes and is_addressable false: the file tools cannot name it (rename it with sandbox_exec).
    """
    who = await authorized(ctx, Scope.SANDBOX_FILES, Action.SANDBOX_LIST_FILES, sandbox_id)
    return await engine(ctx).sandboxes.list_files(who, sandbox_id, path, recursive, max_entries)


@tool_errors
async def sandbox_expose_port(
    ctx: EngineContext,
    sandbox_id: SandboxId,
    port: Annotated[int, Field(ge=1, le=65535, description="The port a server inside the sandbox listens on.")],
) -> PortInfo:
    """Make a port of a sandbox reachable on this machine and return its URL (on 127.0.0.1 only).

    The server inside the sandbox should listen on 127.0.0.1 or 0.0.0.0 at that port. This works
    for sandboxes without a network too. The URL carries the preview's key (dockyard_key=...):
    without it the port refuses every request, so share it only with whoever may see the preview.
    Calling it again for the same port returns the same URL.
    """
    who = await authorized(ctx, Scope.SANDBOX_CREATE, Action.SANDBOX_EXPOSE_PORT, sandbox_id)
    return await engine(ctx).sandboxes.expose_port(who, sandbox_id, port)


@tool_errors
async def sandbox_snapshot(
    ctx: EngineContext,
    sandbox_id: SandboxId,
    label: Annotated[str | None, Field(max_length=200, description="A note to recognise the snapshot by.")] = None,
) -> SnapshotInfo:
    """Save a sandbox's /workspace and home directory as a snapshot; restore it with sandbox_create(from_snapshot=...).

    The sandbox is paused for the moment of the copy, so the snapshot is consistent, and keeps
    running afterwards.
    """
    who = await authorized(ctx, Scope.SANDBOX_CREATE, Action.SANDBOX_SNAPSHOT, sandbox_id)
    return await engine(ctx).snapshots.take(who, sandbox_id, label)


@tool_errors
async def sandbox_list(ctx: EngineContext) -> SandboxList:
    """List your live sandboxes with their templates, limits, exposed ports and expiry times."""
    who = await any_of(ctx, _SANDBOX_SCOPES, Action.SANDBOX_LIST)
    return SandboxList(sandboxes=await engine(ctx).sandboxes.list(who))


@tool_errors
async def sandbox_destroy(ctx: EngineContext, sandbox_id: SandboxId) -> Destroyed:
    """Destroy a sandbox: stop its processes and delete its container and /workspace (snapshots are kept)."""
    who = await authorized(ctx, Scope.SANDBOX_CREATE, Action.SANDBOX_DESTROY, sandbox_id)
    await engine(ctx).sandboxes.destroy(who, sandbox_id)
    return Destroyed(sandbox_id=sandbox_id)


@tool_errors
async def snapshot_delete(
    ctx: EngineContext,
    snapshot_id: Annotated[str, Field(description="A snapshot id (snp_...) from sandbox_snapshot.", max_length=64)],
) -> SnapshotDeleted:
    """Delete a snapshot for good, giving its space back to the workspace's snapshot quota."""
    who = await authorized(ctx, Scope.SANDBOX_CREATE, Action.SNAPSHOT_DELETE, snapshot_id)
    await engine(ctx).snapshots.delete(who, snapshot_id)
    return SnapshotDeleted(snapshot_id=snapshot_id)


@tool_errors
async def snapshot_list(
    ctx: EngineContext,
    sandbox_id: Annotated[
        str | None, Field(max_length=64, description="Only the snapshots of this sandbox; default all of yours.")
    ] = None,
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT, description="Rows per page.")] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None, Field(max_length=2048, description="next_cursor from the page before; omit for the newest.")
    ] = None,
) -> SnapshotPage:
    """List your workspace's snapshots, newest first (id, sandbox, label, size, time), also of
    sandboxes that are gone; page with next_cursor. Restore one with
    sandbox_create(from_snapshot=...)."""
    who = await any_of(ctx, _SANDBOX_SCOPES, Action.SNAPSHOT_LIST)
    return await engine(ctx).snapshots.list_page(who, sandbox_id, limit, cursor)


def register(tools: Toolbox) -> None:
    """Add the sandbox tools."""
    S = Toolset.SANDBOX
    tools.add(sandbox_create, S, "Create a sandbox", ADDITIVE, [Scope.SANDBOX_CREATE])
    tools.add(sandbox_exec, S, "Run a command", DESTRUCTIVE, [Scope.SANDBOX_EXEC], reach=Reach.SANDBOX_NETWORK)
    tools.add(sandbox_write_file, S, "Write a file", DESTRUCTIVE_IDEMPOTENT, [Scope.SANDBOX_FILES])
    tools.add(sandbox_read_file, S, "Read a file", READ_ONLY, [Scope.SANDBOX_FILES])
    tools.add(sandbox_list_files, S, "List files", READ_ONLY, [Scope.SANDBOX_FILES])
    tools.add(sandbox_expose_port, S, "Expose a port", IDEMPOTENT, [Scope.SANDBOX_CREATE])
    tools.add(sandbox_snapshot, S, "Snapshot a sandbox", ADDITIVE, [Scope.SANDBOX_CREATE])
    tools.add(snapshot_delete, S, "Delete a snapshot", DESTRUCTIVE, [Scope.SANDBOX_CREATE])
    tools.add(sandbox_list, S, "List sandboxes", READ_ONLY, _SANDBOX_SCOPES)
    tools.add(sandbox_destroy, S, "Destroy a sandbox", DESTRUCTIVE_IDEMPOTENT, [Scope.SANDBOX_CREATE])
    tools.add(snapshot_list, S, SNAPSHOT_LIST_TITLE, READ_ONLY, _SANDBOX_SCOPES)


def register_resources(server: MCPServer) -> None:
    """Add the command output resource to a server."""
    server.resource(EXEC_OUTPUT_URI, name="exec_output", mime_type="text/plain")(exec_output)
