"""Audit tools: read the record of what was done, and check that nobody rewrote it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field

from dockyard.runtime.substrate.actions import Action, Scope, Toolset
from dockyard.runtime.substrate.models import AuditPage, AuditVerification
from dockyard.tools._annotations import READ_ONLY
from dockyard.tools._context import EngineContext, authorized, engine
from dockyard.tools._errors import tool_errors
from dockyard.tools._toolbox import Toolbox

__all__ = ["register"]

ANY_WORKSPACE = "*"
MAX_ROWS = 1000


@tool_errors
async def audit_query(
    ctx: EngineContext,
    workspace_id: Annotated[
        str | None,
        Field(
            description="Only this workspace's rows; you may name only your own unless you are admin.", max_length=256
        ),
    ] = None,
    actor: Annotated[str | None, Field(description="Only rows of this user id.", max_length=256)] = None,
    kind: Annotated[
        str | None,
        Field(description="Only this action, such as sandbox.exec, sandbox.create or token.mint.", max_length=128),
    ] = None,
    since: Annotated[
        datetime | None, Field(description="Only rows at or after this time (ISO 8601; UTC if no zone).")
    ] = None,
    until: Annotated[
        datetime | None, Field(description="Only rows before this time (ISO 8601; UTC if no zone).")
    ] = None,
    limit: Annotated[
        int,
        Field(ge=1, le=MAX_ROWS, description=f"At most this many rows (1-{MAX_ROWS}); a page also fits the budget."),
    ] = 100,
    details: Annotated[
        bool, Field(description="Include each row's detail (commands, paths, exit codes...); off by default.")
    ] = False,
    cursor: Annotated[
        str | None, Field(description="next_cursor of the previous page, with the same filters.", max_length=200)
    ] = None,
) -> AuditPage:
    """Read the audit log, newest first: every action taken in your workspace (sandbox created,
    command run, file written, token minted, call refused...) with who did it (user, run and
    token), what it acted on, when, how it ended (ok, error, denied, cancelled), its details and
    how long it took. Filter by actor (user id), kind, and a time window; you see only your own
    workspace's rows. A page fits the result budget (about 16 KB): rows leave out their detail
    unless details=true, and when more rows match, pass next_cursor back as cursor to read on.
    Read-only."""
    who = await authorized(ctx, Scope.AUDIT_READ, Action.AUDIT_QUERY)
    if who.workspace_id != ANY_WORKSPACE:
        if workspace_id not in (None, who.workspace_id):
            raise await engine(ctx).tokens.deny(
                who,
                Action.AUDIT_QUERY,
                f"you may read only your own workspace's audit rows ('{who.workspace_id}'), not those of "
                f"'{workspace_id}'; leave workspace_id out",
                target=workspace_id,
            )
        workspace_id = who.workspace_id
    return await engine(ctx).audit_pages.read(
        workspace_id=workspace_id,
        actor=actor,
        kind=kind,
        since=since,
        until=until,
        limit=limit,
        details=details,
        cursor=cursor,
    )


@tool_errors
async def audit_verify(ctx: EngineContext) -> AuditVerification:
    """Check that the audit log is intact: walk its whole hash chain (each row's hash covers its
    content and the previous row's hash, and each row carries a MAC under a key kept outside the
    database) and compare it with the signed head kept outside the table. Reports the rows
    checked and, if the log was tampered with, each finding by kind: edited (a row changed),
    deleted (rows missing in the middle), reordered, recomputed (the chain rewritten without the
    key), truncated (rows cut from the tail), emptied, head_missing, head_forged or key_missing,
    with the first broken row's id. Read-only; it can take a moment on a long log."""
    await authorized(ctx, Scope.AUDIT_READ, Action.AUDIT_VERIFY)
    return await engine(ctx).audit.verify()


def register(tools: Toolbox) -> None:
    """Add the audit tools."""
    tools.add(audit_query, Toolset.ADMIN, "Read the audit log", READ_ONLY, [Scope.AUDIT_READ])
    tools.add(audit_verify, Toolset.ADMIN, "Verify the audit log", READ_ONLY, [Scope.AUDIT_READ])
