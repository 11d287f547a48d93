"""Scope narrowing on a real SQLite store: what a minted token may hold given the token it is
minted from. Scopes only a subset, attribution the same, no run its parent is not bound to, an
expiry no later than its parent's; revoking a token revokes what came from it; every refusal
is on the audit record."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.errors import AccessDeniedError, InvalidRequestError, ScopeError
from dockyard.runtime.substrate.settings import Identity
from dockyard.runtime.substrate.store import Store
from dockyard.runtime.substrate.tokens import ADMIN, SCOPES, TokenService

pytestmark = pytest.mark.anyio

scope_sets = st.sets(st.sampled_from(SCOPES), min_size=1)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = Store(tmp_path / "dockyard.db")
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture
def audit(store: Store, tmp_path: Path) -> AuditLog:
    return AuditLog(store, tmp_path)


@pytest.fixture
def tokens(store: Store, audit: AuditLog) -> TokenService:
    return TokenService(store, audit, "admin-key")


async def parent_with(tokens: TokenService, scopes: set[str], **attribution: str) -> Identity:
    """A token of workspace acme (user alice unless told) that may mint, holding `scopes`."""
    fields = {"workspace_id": "acme", "project_id": "web", "user_id": "alice", **attribution}
    minted = await tokens.mint(ADMIN, scopes=sorted(scopes | {"token:mint"}), **fields)
    return minted.identity


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(held=scope_sets, asked=scope_sets)
async def test_a_token_mints_exactly_the_subsets_of_its_own_scopes(
    tokens: TokenService, held: set[str], asked: set[str]
) -> None:
    parent = await parent_with(tokens, held)
    if asked <= held | {"token:mint"}:
        child = (await tokens.mint(parent, scopes=sorted(asked))).identity
        assert set(child.scopes) == asked
        assert (child.workspace_id, child.project_id, child.user_id) == ("acme", "web", "alice")
    else:
        with pytest.raises(AccessDeniedError, match="can only mint narrower tokens; yours lacks"):
            await tokens.mint(parent, scopes=sorted(asked))


async def test_every_scope_is_minted_only_by_a_holder_of_every_scope(tokens: TokenService) -> None:
    everything = await parent_with(tokens, set(SCOPES))
    with pytest.raises(AccessDeniedError, match="lacks \\*"):
        await tokens.mint(everything, scopes=["*"])
    root = (await tokens.mint(ADMIN, scopes=["*"], workspace_id="acme")).identity
    assert (await tokens.mint(root, scopes=["*"])).identity.scopes == ["*"]
    assert set((await tokens.mint(root, scopes=list(SCOPES))).identity.scopes) == set(SCOPES)


@pytest.mark.parametrize("field", ["workspace_id", "project_id", "user_id"])
async def test_a_token_keeps_its_attribution_and_cannot_move_to_another(tokens: TokenService, field: str) -> None:
    parent = await parent_with(tokens, {"sandbox:exec"})
    same = (await tokens.mint(parent, scopes=["sandbox:exec"], **{field: getattr(parent, field)})).identity
    assert getattr(same, field) == getattr(parent, field)
    with pytest.raises(AccessDeniedError, match=f"{field} must stay '{getattr(parent, field)}', not 'elsewhere'"):
        await tokens.mint(parent, scopes=["sandbox:exec"], **{field: "elsewhere"})


async def test_the_admin_key_mints_for_a_named_workspace_only(tokens: TokenService) -> None:
    with pytest.raises(InvalidRequestError, match="say which workspace"):
        await tokens.mint(ADMIN, scopes=["sandbox:exec"])
    with pytest.raises(InvalidRequestError, match="say which workspace"):
        await tokens.mint(ADMIN, scopes=["sandbox:exec"], workspace_id="acme", user_id="*")
    minted = (await tokens.mint(ADMIN, scopes=["sandbox:exec"], workspace_id="acme")).identity
    assert (minted.workspace_id, minted.project_id, minted.user_id) == ("acme", "default", "user")


async def test_a_run_binding_is_passed_on_but_never_named_by_the_minter(tokens: TokenService) -> None:
    parent = await parent_with(tokens, {"sandbox:exec", "dispatch:create"})
    with pytest.raises(AccessDeniedError, match="cannot be named: your token is bound to no run"):
        await tokens.mint(parent, scopes=["sandbox:exec"], run_id="run_1")
    run = (
        await tokens.mint_for_run(
            parent,
            "run_1",
            ["sandbox:exec", "audit:read", "token:mint"],
            parent_expiry(tokens, parent),
            sandbox_id="sbx_1",
        )
    ).identity
    assert set(run.scopes) == {"sandbox:exec", "token:mint"}  # what the run asked for, cut to what its caller holds
    child = (await tokens.mint(run, scopes=["sandbox:exec"])).identity
    assert (child.run_id, child.sandbox_id) == ("run_1", "sbx_1")
    with pytest.raises(AccessDeniedError, match="run_id must stay 'run_1'"):
        await tokens.mint(run, scopes=["sandbox:exec"], run_id="run_2")


def parent_expiry(tokens: TokenService, parent: Identity) -> datetime:
    expiry = tokens.expiry(parent.token_id)
    assert expiry is not None
    return expiry


async def test_a_token_never_outlives_the_token_it_came_from(tokens: TokenService) -> None:
    parent = (await tokens.mint(ADMIN, scopes=["token:mint", "sandbox:exec"], workspace_id="acme", ttl_s=600)).identity
    ceiling = parent_expiry(tokens, parent)
    clipped = await tokens.mint(parent, scopes=["sandbox:exec"])  # the default day is cut to the parent's ten minutes
    assert clipped.expires_at == ceiling
    shorter = await tokens.mint(parent, scopes=["sandbox:exec"], ttl_s=60)
    assert shorter.expires_at is not None and shorter.expires_at < ceiling - timedelta(minutes=8)
    with pytest.raises(AccessDeniedError, match="cannot outlive its issuer"):
        await tokens.mint(parent, scopes=["sandbox:exec"], ttl_s=3600)
    for ttl in (0, 366 * 86400):
        with pytest.raises(InvalidRequestError, match="ttl_s must be between"):
            await tokens.mint(parent, scopes=["sandbox:exec"], ttl_s=ttl)


async def test_a_token_without_the_mint_scope_mints_nothing(tokens: TokenService) -> None:
    holder = (await tokens.mint(ADMIN, scopes=["sandbox:exec"], workspace_id="acme")).identity
    with pytest.raises(ScopeError, match="token:mint"):
        await tokens.mint(holder, scopes=["sandbox:exec"])


async def test_revoking_a_token_revokes_everything_minted_from_it_and_nothing_more_is_minted(
    tokens: TokenService,
) -> None:
    parent = await parent_with(tokens, {"sandbox:exec"})
    child = (await tokens.mint(parent, scopes=["sandbox:exec", "token:mint"])).identity
    grandchild = await tokens.mint(child, scopes=["sandbox:exec"])
    sibling = await tokens.mint(await parent_with(tokens, {"sandbox:exec"}), scopes=["sandbox:exec"])
    await tokens.revoke(parent, child.token_id or "")
    with pytest.raises(AccessDeniedError, match="came from a revoked token"):
        await tokens.verify(grandchild.token)
    with pytest.raises(AccessDeniedError, match="was revoked"):
        await tokens.mint(child, scopes=["sandbox:exec"])
    assert (await tokens.verify(sibling.token)).token_id == sibling.token_id


async def test_every_refusal_is_an_audit_row_and_the_chain_holds(tokens: TokenService, audit: AuditLog) -> None:
    parent = await parent_with(tokens, {"sandbox:exec"})
    with pytest.raises(AccessDeniedError):
        await tokens.mint(parent, scopes=["audit:read"])
    with pytest.raises(AccessDeniedError):
        await tokens.mint(parent, scopes=["sandbox:exec"], workspace_id="rival")
    denied = [row for row in await audit.query(kind="token.mint") if row.outcome == "denied"]
    assert [row.token_id for row in denied] == [parent.token_id] * 2
    assert (await audit.verify()).intact
