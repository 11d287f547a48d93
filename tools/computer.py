"""Computer tools: a headless browser of your own, to open your sandboxes' previews, read them
as accessibility trees, click, type and take screenshots."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver.utilities.types import Image
from pydantic import BaseModel, Field

from dockyard.runtime.substrate.actions import Action, Scope, Toolset
from dockyard.runtime.substrate.models import ComputerInfo, ComputerList, PageState
from dockyard.tools._annotations import ADDITIVE, DESTRUCTIVE, DESTRUCTIVE_IDEMPOTENT, READ_ONLY, Reach
from dockyard.tools._context import EngineContext, authorized, engine
from dockyard.tools._errors import tool_errors
from dockyard.tools._progress import build_notes, live
from dockyard.tools._toolbox import Toolbox

__all__ = ["register"]

ComputerId = Annotated[str, Field(max_length=64, description="A computer id (cmp_...) from computer_create.")]
Ref = Annotated[
    str, Field(min_length=1, max_length=40, description="An element ref from computer_snapshot, such as e12.")
]


class Destroyed(BaseModel):
    computer_id: str
    destroyed: bool = True


@tool_errors
async def computer_create(
    ctx: EngineContext,
    template: Annotated[
        str | None, Field(max_length=64, description="A computer template; default 'computer'.")
    ] = None,
    width: Annotated[int | None, Field(ge=200, le=3840, description="Viewport width in pixels (default 1280).")] = None,
    height: Annotated[
        int | None, Field(ge=200, le=2160, description="Viewport height in pixels (default 800).")
    ] = None,
    ttl_s: Annotated[int | None, Field(ge=60, description="Destroy it after this many seconds (default 1 h).")] = None,
) -> ComputerInfo:
    """Get a headless Chromium of your own, already running (it comes from a warm pool). It has
    no network of its own: it opens the previews of your workspace's sandboxes (the URLs
    sandbox_expose_port gives) and nothing else. Drive it with computer_navigate,
    computer_snapshot, computer_click, computer_type and computer_screenshot."""
    who = await authorized(ctx, Scope.COMPUTER_USE, Action.COMPUTER_CREATE)
    async with live(ctx) as progress:  # heartbeats while it waits for an image build or the pool
        return await engine(ctx).computers.create(
            who, template=template, width=width, height=height, ttl_s=ttl_s, notify=build_notes(progress)
        )


@tool_errors
async def computer_list(ctx: EngineContext) -> ComputerList:
    """Your workspace's live computers."""
    who = await authorized(ctx, Scope.COMPUTER_USE, Action.COMPUTER_LIST)
    return ComputerList(computers=await engine(ctx).computers.list(who))


@tool_errors
async def computer_navigate(
    ctx: EngineContext,
    computer_id: ComputerId,
    url: Annotated[
        str, Field(min_length=1, max_length=4000, description="An http URL from sandbox_expose_port, or about:blank.")
    ],
) -> PageState:
    """Open a URL and wait for it to load; returns the page's URL and title. Other hosts,
    file:// and other schemes are refused."""
    who = await authorized(ctx, Scope.COMPUTER_USE, Action.COMPUTER_NAVIGATE, computer_id)
    return await engine(ctx).pages.navigate(who, computer_id, url)


@tool_errors
async def computer_snapshot(
    ctx: EngineContext,
    computer_id: ComputerId,
    ref: Annotated[
        str | None, Field(max_length=40, description="Only the subtree of this element (a ref such as e12).")
    ] = None,
    budget: Annotated[
        int | None, Field(ge=500, description="At most this many characters (default and cap: the result budget).")
    ] = None,
    offset: Annotated[int, Field(ge=0, description="Start here (a previous snapshot's next_offset).")] = 0,
) -> PageState:
    """Read the page as an accessibility tree (roles, names, text, values), far cheaper than a
    screenshot. Each element you can act on has a ref such as [ref=e12]: pass it to
    computer_click or computer_type. Refs go stale when the page changes: snapshot again.
    A long tree is cut at a whole line within the budget (about 16 KB) and says so (has_more,
    next_offset, a marker line): read on with offset, or pass ref to read one element's subtree."""
    who = await authorized(ctx, Scope.COMPUTER_USE, Action.COMPUTER_SNAPSHOT, computer_id)
    return await engine(ctx).pages.snapshot(who, computer_id, ref=ref, offset=offset, budget=budget)


@tool_errors
async def computer_click(ctx: EngineContext, computer_id: ComputerId, ref: Ref) -> PageState:
    """Click an element by its ref from computer_snapshot; waits briefly for a page it opens."""
    who = await authorized(ctx, Scope.COMPUTER_USE, Action.COMPUTER_CLICK, computer_id)
    return await engine(ctx).pages.click(who, computer_id, ref)


@tool_errors
async def computer_type(
    ctx: EngineContext,
    computer_id: ComputerId,
    ref: Ref,
    text: Annotated[str, Field(max_length=100_000, description="The text; it replaces the field's content.")],
    submit: Annotated[bool, Field(description="Press Enter afterwards (submits most forms).")] = False,
) -> PageState:
    """Type into a field by its ref (its content is replaced). Text typed into a password field
    is masked in the audit log."""
    who = await authorized(ctx, Scope.COMPUTER_USE, Action.COMPUTER_TYPE, computer_id)
    return await engine(ctx).pages.type(who, computer_id, ref, text, submit)


@tool_errors
async def computer_press(
    ctx: EngineContext,
    computer_id: ComputerId,
    key: Annotated[
        str, Field(min_length=1, max_length=40, description="A key such as Enter, Tab, Escape, ArrowDown or Control+A.")
    ],
) -> PageState:
    """Press a key (or a combination) in the page."""
    who = await authorized(ctx, Scope.COMPUTER_USE, Action.COMPUTER_PRESS, computer_id)
    return await engine(ctx).pages.press(who, computer_id, key)


@tool_errors
async def computer_scroll(
    ctx: EngineContext,
    computer_id: ComputerId,
    dy: Annotated[int, Field(ge=-100_000, le=100_000, description="Pixels down (negative: up).")] = 600,
    dx: Annotated[int, Field(ge=-100_000, le=100_000, description="Pixels right (negative: left).")] = 0,
    ref: Annotated[str | None, Field(max_length=40, description="Instead, scroll this element into view.")] = None,
) -> PageState:
    """Scroll the page by pixels, or bring an element into view."""
    who = await authorized(ctx, Scope.COMPUTER_USE, Action.COMPUTER_SCROLL, computer_id)
    return await engine(ctx).pages.scroll(who, computer_id, dx, dy, ref)


@tool_errors
async def computer_wait_for(
    ctx: EngineContext,
    computer_id: ComputerId,
    text: Annotated[str, Field(min_length=1, max_length=1000, description="Text to wait for.")],
    timeout_s: Annotated[float, Field(gt=0, le=120)] = 10,
) -> PageState:
    """Wait until some text shows on the page (after an action that loads something)."""
    who = await authorized(ctx, Scope.COMPUTER_USE, Action.COMPUTER_WAIT_FOR, computer_id)
    async with live(ctx):
        return await engine(ctx).pages.wait_for(who, computer_id, text, timeout_s)


@tool_errors
async def computer_upload(
    ctx: EngineContext,
    computer_id: ComputerId,
    ref: Ref,
    sandbox_id: Annotated[str, Field(max_length=64, description="The sandbox the file is in.")],
    path: Annotated[str, Field(min_length=1, max_length=4096, description="The file's path under /workspace.")],
) -> PageState:
    """Put a file from one of your sandboxes into a file input (by its ref), as if picked in
    the browser's file dialog."""
    who = await authorized(ctx, Scope.COMPUTER_USE, Action.COMPUTER_UPLOAD, computer_id)
    await authorized(ctx, Scope.SANDBOX_FILES, Action.COMPUTER_UPLOAD, sandbox_id)
    return await engine(ctx).pages.upload(who, computer_id, ref, sandbox_id, path)


@tool_errors
async def computer_screenshot(
    ctx: EngineContext,
    computer_id: ComputerId,
    full_page: Annotated[bool, Field(description="The whole page rather than the viewport.")] = False,
) -> Image:
    """A PNG screenshot of the page, as an image."""
    who = await authorized(ctx, Scope.COMPUTER_USE, Action.COMPUTER_SCREENSHOT, computer_id)
    return Image(data=await engine(ctx).pages.screenshot(who, computer_id, full_page), format="png")


@tool_errors
async def computer_destroy(ctx: EngineContext, computer_id: ComputerId) -> Destroyed:
    """End the computer. Its browser is removed with everything it held; none is ever reused."""
    who = await authorized(ctx, Scope.COMPUTER_USE, Action.COMPUTER_DESTROY, computer_id)
    await engine(ctx).computers.destroy(who, computer_id)
    return Destroyed(computer_id=computer_id)


def register(tools: Toolbox) -> None:
    """Add the computer tools. Acting on a page can do whatever the page does (delete, submit)."""
    C, use, web = Toolset.COMPUTER, [Scope.COMPUTER_USE], Reach.WEB_PAGES
    tools.add(computer_create, C, "Start a browser", ADDITIVE, use)
    tools.add(computer_navigate, C, "Open a URL", ADDITIVE, use, reach=web)
    tools.add(computer_click, C, "Click an element", DESTRUCTIVE, use, reach=web)
    tools.add(computer_type, C, "Type into a field", DESTRUCTIVE, use, reach=web)
    tools.add(computer_press, C, "Press a key", DESTRUCTIVE, use, reach=web)
    tools.add(computer_scroll, C, "Scroll the page", ADDITIVE, use)
    tools.add(computer_upload, C, "Upload a file", DESTRUCTIVE, use, reach=web)
    tools.add(computer_list, C, "List browsers", READ_ONLY, use)
    tools.add(computer_snapshot, C, "Read the page", READ_ONLY, use)
    tools.add(computer_wait_for, C, "Wait for text", READ_ONLY, use)
    tools.add(computer_screenshot, C, "Screenshot the page", READ_ONLY, use)
    tools.add(computer_destroy, C, "End a browser", DESTRUCTIVE_IDEMPOTENT, use)
