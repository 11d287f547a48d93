"""Token tools: who the caller is, minting narrower tokens, revoking them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, Field

from dockyard.runtime.substrate.actions import Action, Scope, Toolset
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.tokens import SCOPES
from dockyard.tools._annotations import ADDITIVE, DESTRUCTIVE_IDEMPOTENT, READ_ONLY
from dockyard.tools._context import EngineContext, caller, current, engine
from dockyard.tools._errors import tool_errors
from dockyard.tools._toolbox import Toolbox

__all__ = ["register"]


class MintedToken(BaseModel):
    """A new token. The secret is shown only here: keep it, the server stores only its hash."""

    token: str
    token_id: str
    identity: Identity
    expires_at: datetime | None


class Revoked(BaseModel):
    token_id: str
    revoked: bool = True
    reason: str | None = None


@tool_errors
async def whoami(ctx: EngineContext) -> Identity:
    """Show who you are acting as: the workspace, project, user and run every sandbox you
    create and every action you take is attributed to, your token's scopes ('*' is every
    scope), your token's id, and, for a sandbox's own token, the one sandbox it may act on.
    Costs nothing; safe to call any time."""
    return await current(ctx, Action.WHOAMI)


@tool_errors
async def token_mint(
    ctx: EngineContext,
    scopes: Annotated[
        list[str],
        Field(min_length=1, max_length=len(SCOPES), description=f"Scopes, a subset of yours: {', '.join(SCOPES)}."),
    ],
    workspace_id: Annotated[
        str | None, Field(max_length=128, description="Workspace; default yours (you cannot name another).")
    ] = None,
    project_id: Annotated[str | None, Field(max_length=128, description="Project; default yours.")] = None,
    user_id: Annotated[str | None, Field(max_length=128, description="User; default yours.")] = None,
    run_id: Annotated[
        str | None,
        Field(
            max_length=128,
            description="Only your own token's run (tokens keep it anyway); runs are bound by dockyard, never named.",
        ),
    ] = None,
    ttl_s: Annotated[
        int | None, Field(gt=0, description="Lifetime in seconds; default 24 h, never past your own token's expiry.")
    ] = None,
    label: Annotated[str | None, Field(max_length=200, description="A note for the audit log.")] = None,
) -> MintedToken:
    """Mint a bearer token for another client or agent, never wider than your own: a subset of
    your scopes, the same or a narrower workspace/project/user, your own run and sandbox (if
    any), and an expiry no later than yours. Needs the token:mint scope. The secret is returned
    once; revoke it with token_revoke, which also revokes every token minted from it."""
    minted = await engine(ctx).tokens.mint(
        caller(ctx),
        scopes=scopes,
        workspace_id=workspace_id,
        project_id=project_id,
        user_id=user_id,
        run_id=run_id,
        ttl_s=ttl_s,
        label=label,
    )
    return MintedToken(
        token=minted.token, token_id=minted.token_id, identity=minted.identity, expires_at=minted.expires_at
    )


@tool_errors
async def token_revoke(
    ctx: EngineContext,
    token_id: Annotated[str, Field(max_length=64, description="The token's id (tok_...), as token_mint returned it.")],
) -> Revoked:
    """Revoke a token of your workspace at once, and every token minted from it: every later
    call with any of them is refused, open sessions included. Needs the token:mint scope."""
    row = await engine(ctx).tokens.revoke(caller(ctx), token_id)
    return Revoked(token_id=row.id, reason=row.revoked_reason)


def register(tools: Toolbox) -> None:
    """Add the token tools."""
    tools.add(whoami, Toolset.SANDBOX, "Who am I", READ_ONLY, [])  # listed to every caller
    tools.add(token_mint, Toolset.ADMIN, "Mint a token", ADDITIVE, [Scope.TOKEN_MINT])
    tools.add(token_revoke, Toolset.ADMIN, "Revoke a token", DESTRUCTIVE_IDEMPOTENT, [Scope.TOKEN_MINT])
