"""Dispatch tools: send a task to where it should run, collect its result, or stop it."""

from __future__ import annotations

from typing import Annotated, Literal

from mcp.server.elicitation import AcceptedElicitation, CancelledElicitation, ElicitationResult
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError
from mcp.server.mcpserver.resolve import Elicit, Resolve
from pydantic import BaseModel, Field

from dockyard.runtime.substrate.actions import Action, Scope, Toolset
from dockyard.runtime.substrate.errors import DockyardError, NotFoundError
from dockyard.runtime.substrate.listings import DEFAULT_LIMIT, MAX_LIMIT, DispatchPage
from dockyard.runtime.substrate.models import DispatchInfo
from dockyard.runtime.substrate.store import DispatchStatus
from dockyard.tools._annotations import ADDITIVE, DESTRUCTIVE, DESTRUCTIVE_IDEMPOTENT, READ_ONLY, Reach
from dockyard.tools._context import EngineContext, authorized, caller, engine
from dockyard.tools._errors import tool_errors
from dockyard.tools._progress import live
from dockyard.tools._toolbox import Toolbox

__all__ = ["register"]

DispatchId = Annotated[str, Field(description="A dispatch id (dsp_...) from dispatch or dispatch_list.", max_length=64)]
DISPATCH_LIST_TITLE = "List dispatches"


class HostConsent(BaseModel):
    """The user's answer before a task runs on their own machine."""

    run_on_this_computer: bool = Field(description="Run it here, outside any sandbox?")


_NOT_ASKED = "not asked"
_CANNOT_ASK = "unavailable"


async def host_consent(
    ctx: EngineContext, mode: str, task_summary: str, prompt: str | None = None, runner: str | None = None
) -> str | Elicit[HostConsent]:
    """Ask the user before a `user_pc` dispatch runs on their machine (and only then)."""
    question = engine(ctx).dispatches.consent_question(caller(ctx), mode, task_summary, prompt, runner)
    if question is None:
        return _NOT_ASKED
    capabilities = ctx.client_capabilities
    if capabilities is None or capabilities.elicitation is None:
        return _CANNOT_ASK
    return Elicit(question, HostConsent)


def _consent(answer: ElicitationResult[HostConsent]) -> str | None:
    if isinstance(answer, AcceptedElicitation):
        if isinstance(answer.data, HostConsent):
            return "confirmed" if answer.data.run_on_this_computer else "declined"
        return None if answer.data == _NOT_ASKED else "unavailable"
    return "cancelled" if isinstance(answer, CancelledElicitation) else "declined"


@tool_errors
async def dispatch(
    ctx: EngineContext,
    mode: Annotated[
        Literal["local", "remote", "team_single_vm", "team_multi_vm", "user_pc"],
        Field(
            description="'remote': a fresh isolated sandbox from the pool, destroyed when the dispatch ends; "
            "'local': your own sandbox (give sandbox_id), which keeps what the run leaves; 'team_single_vm': one "
            "runner per member in one fresh sandbox; 'team_multi_vm': each member in a fresh sandbox of its own "
            "(team sandboxes are destroyed at the end too); 'user_pc': the user's own machine, outside any sandbox "
            "(only where enabled, after the user confirms). capabilities lists the modes open to you."
        ),
    ],
    rationale: Annotated[str, Field(min_length=1, max_length=1000, description="One sentence: why this mode.")],
    task_summary: Annotated[
        str, Field(min_length=1, max_length=2000, description="What the task is, in a line or two.")
    ],
    prompt: Annotated[
        str | None,
        Field(
            max_length=100_000,
            description="The work: for a 'script' runner a bash script; for a 'command' runner the task handed to "
            "its agent CLI; for an 'llm' runner the task for the model. Not used by team modes (see members).",
        ),
    ] = None,
    runner: Annotated[
        str | None,
        Field(
            max_length=64,
            description="A runner profile from config; default 'script'. capabilities lists the profiles here, "
            "their kinds and what prompt means for each.",
        ),
    ] = None,
    sandbox_id: Annotated[
        str | None, Field(max_length=64, description="For mode 'local': the sandbox to run in.")
    ] = None,
    members: Annotated[
        list[str] | None,
        Field(
            max_length=8,
            description="For team modes: one prompt per member, each meaning what prompt means for the runner.",
        ),
    ] = None,
    consent: Annotated[ElicitationResult[HostConsent], Resolve(host_consent)] = None,  # type: ignore[assignment]
) -> DispatchInfo:
    """Start a task where it should run and return at once with its dispatch_id; the work goes
    on in the background. Pick the mode and say why in one sentence. Phrases in the task such
    as "clean environment" or "async" make it run remote, "use a team" a team mode (the result
    says so). The runner's output (a script's stdout, an agent's answer) is the result; a
    remote or team sandbox is destroyed when the dispatch ends, so have the work print or hand
    in what you need. Team modes run one runner per member and join their outputs in order as
    '[member N] ...' lines (nothing merges or judges them); one failed member fails the
    dispatch. 'user_pc' runs on the user's own machine where the server allows it, after the
    user confirms. capabilities lists the modes and runners; collect the result with
    await_dispatch, find earlier dispatches with dispatch_list, stop one with cancel_dispatch."""
    who = await authorized(ctx, Scope.DISPATCH_CREATE, Action.DISPATCH_CREATE)
    return await engine(ctx).dispatches.dispatch(
        who,
        mode=mode,
        rationale=rationale,
        task_summary=task_summary,
        prompt=prompt,
        runner=runner,
        sandbox_id=sandbox_id,
        members=members,
        consent=_consent(consent),
    )


@tool_errors
async def await_dispatch(
    ctx: EngineContext,
    dispatch_id: DispatchId,
    timeout_s: Annotated[float, Field(ge=0, le=3600, description="Wait at most this long (default 60 s).")] = 60,
) -> DispatchInfo:
    """Wait for a dispatch to finish, up to timeout_s, and return its status (queued, running,
    completed, failed, cancelled, interrupted) with its result or error. If it is still
    running at the timeout, call again: the same dispatch goes on. A dispatch that was running
    when dockyard restarted is 'interrupted' and is not re-run.

    While it waits, progress notifications (if you pass a progress token) stream the run's
    output as sandbox_exec does (the latest few KiB first, then each line within 50 ms; a team
    member's lines start with `[member N] `, an llm runner's text and tool calls are shown),
    each status change as `[dockyard] dispatch ... is <status>`, and a heartbeat every few
    seconds while it is quiet."""
    who = await authorized(ctx, Scope.DISPATCH_READ, Action.DISPATCH_AWAIT, dispatch_id)
    async with live(ctx) as progress:

        async def status(now: str) -> None:
            await progress.note(f"dispatch {dispatch_id} is {now}")

        return await engine(ctx).dispatches.wait(
            who, dispatch_id, timeout_s, on_status=status, on_output=progress.output
        )


@tool_errors
async def dispatch_list(
    ctx: EngineContext,
    status: Annotated[
        list[DispatchStatus] | None,
        Field(max_length=6, description="Only dispatches in these states; default all."),
    ] = None,
    limit: Annotated[int, Field(ge=1, le=MAX_LIMIT, description="Rows per page.")] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None, Field(max_length=2048, description="next_cursor from the page before; omit for the newest.")
    ] = None,
) -> DispatchPage:
    """List your workspace's dispatches, newest first, one compact row each (id, status, mode,
    runner, summary, who started it, when); filter by status (e.g. ["queued", "running"]) and
    page with next_cursor. await_dispatch gives one's full result."""
    who = await authorized(ctx, Scope.DISPATCH_READ, Action.DISPATCH_LIST)
    return await engine(ctx).dispatches.list_page(who, [str(s) for s in status or []], limit, cursor)


async def dispatch_resource(dispatch_id: str, ctx: EngineContext) -> str:
    """A dispatch's status and whole result (await_dispatch cuts it to the result budget), as JSON.
    Subscribe to be told when it changes."""
    try:
        who = await authorized(ctx, Scope.DISPATCH_READ, Action.DISPATCH_READ, dispatch_id)
        return (await engine(ctx).dispatches.get(who, dispatch_id, whole=True)).model_dump_json()
    except NotFoundError as exc:
        raise ResourceNotFoundError(str(exc)) from exc
    except DockyardError as exc:
        raise ResourceError(str(exc)) from exc


@tool_errors
async def cancel_dispatch(ctx: EngineContext, dispatch_id: DispatchId) -> DispatchInfo:
    """Stop a dispatch: its runner is killed and its sandbox goes back to the pool. A dispatch
    that already finished keeps its result."""
    who = await authorized(ctx, Scope.DISPATCH_CREATE, Action.DISPATCH_CANCEL, dispatch_id)
    return await engine(ctx).dispatches.cancel(who, dispatch_id)


@tool_errors
async def dispatch_submit(
    ctx: EngineContext,
    dispatch_id: DispatchId,
    result: Annotated[str, Field(max_length=1_000_000, description="The result of the work, as text.")],
    proof: Annotated[
        str, Field(max_length=200, description="The run's token: the DOCKYARD_TOKEN in your environment.")
    ],
) -> DispatchInfo:
    """For a runner doing a dispatch's work: hand in its result (once), proven by the run's
    token from DOCKYARD_TOKEN. It becomes the dispatch's result when the runner ends. A second
    submission, or one without this run's token, is refused and recorded."""
    return await engine(ctx).dispatches.submit(caller(ctx), dispatch_id, result, proof)


DISPATCH_URI = "dockyard://dispatches/{dispatch_id}"


def register(tools: Toolbox) -> None:
    """Add the dispatch tools. dispatch_submit needs no scope, only its run's token as proof."""
    D = Toolset.DISPATCH
    tools.add(dispatch, D, "Dispatch a task", DESTRUCTIVE, [Scope.DISPATCH_CREATE], reach=Reach.RUNNERS)
    tools.add(await_dispatch, D, "Wait for a dispatch", READ_ONLY, [Scope.DISPATCH_READ])
    tools.add(dispatch_submit, D, "Submit a run's result", ADDITIVE, [])
    tools.add(cancel_dispatch, D, "Cancel a dispatch", DESTRUCTIVE_IDEMPOTENT, [Scope.DISPATCH_CREATE])
    tools.add(dispatch_list, D, DISPATCH_LIST_TITLE, READ_ONLY, [Scope.DISPATCH_READ])


def register_resources(server: MCPServer) -> None:
    """Add the dispatch resource to a server."""
    server.resource(DISPATCH_URI, name="dispatch", mime_type="application/json")(dispatch_resource)
