"""`dockyard serve --http` says honestly how to authenticate: bearer tokens it minted, no OAuth.

A 401 without a token carries a plain `Bearer` challenge (no error: nothing was refused), one
with a refused token says `invalid_token`, and no OAuth or OpenID metadata is served that would
send a client looking for an authorization server dockyard is not.
"""

from __future__ import annotations

import json

import httpx2
import pytest
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import call
from tests.served import Served, connect, mint

pytestmark = pytest.mark.anyio

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}},
}
HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def post(served: Served, authorization: str | None) -> httpx2.Response:
    headers = dict(HEADERS) if authorization is None else {**HEADERS, "Authorization": authorization}
    return httpx2.post(f"{served.url}/mcp", content=json.dumps(INITIALIZE), headers=headers, timeout=30)


async def test_a_request_without_a_token_gets_a_plain_bearer_challenge_and_no_error(served: Served) -> None:
    for authorization in (None, "Basic YTpi", "Bearer"):
        answer = post(served, authorization)
        assert answer.status_code == 401, authorization
        assert answer.headers["www-authenticate"] == "Bearer", authorization
        assert "resource_metadata" not in answer.headers["www-authenticate"]
        assert "bearer token" in answer.json()["error"]["message"]


async def test_a_refused_token_gets_invalid_token(served: Served) -> None:
    revoked = await mint(served, scopes=["sandbox:exec"], workspace_id="a")
    async with connect(served, served.admin_key) as admin:
        await call(admin, "token_revoke", token_id=revoked["token_id"])
    for token in ("dyt_not-a-token-of-ours", "garbage", revoked["token"]):
        answer = post(served, f"Bearer {token}")
        assert answer.status_code == 401, token
        challenge = answer.headers["www-authenticate"]
        assert challenge.startswith('Bearer error="invalid_token"'), challenge
        assert "resource_metadata" not in challenge
        assert "refused" in answer.json()["error"]["message"]


async def test_no_oauth_or_openid_metadata_is_served(served: Served) -> None:
    paths = [
        "/.well-known/oauth-protected-resource",
        "/.well-known/oauth-protected-resource/mcp",
        "/.well-known/oauth-authorization-server",
        "/.well-known/oauth-authorization-server/mcp",
        "/.well-known/openid-configuration",
        "/authorize",
        "/token",
        "/register",
    ]
    for path in paths:
        assert httpx2.get(f"{served.url}{path}", timeout=30).status_code == 404, path
    assert httpx2.get(f"{served.url}/healthz", timeout=30).status_code == 200


async def test_the_official_client_works_with_a_good_token(served: Served) -> None:
    minted = await mint(served, scopes=["sandbox:exec"], workspace_id="a", user_id="ann")
    async with connect(served, minted["token"]) as client:
        who = await call(client, "whoami")
    assert (who["workspace_id"], who["user_id"]) == ("a", "ann")


async def test_the_official_client_without_a_token_fails_with_an_auth_error_and_asks_nothing_else(
    served: Served,
) -> None:
    asked: list[str] = []

    async def note(request: httpx2.Request) -> None:
        asked.append(request.url.path)

    async with httpx2.AsyncClient(timeout=60, event_hooks={"request": [note]}) as http:
        with pytest.raises(BaseException) as refused:  # the client wraps the error in a group: looked into below
            async with Client(streamable_http_client(f"{served.url}/mcp", http_client=http)):
                pass
    errors = [exc for exc in _leaves(refused.value) if isinstance(exc, MCPError)]
    assert errors, refused.value
    assert all("needs a bearer token" in exc.error.message for exc in errors)
    assert asked and set(asked) == {"/mcp"}, asked  # no discovery of an authorization server


def _leaves(exc: BaseException) -> list[BaseException]:
    """Every exception in a (nested) group, and the context each was raised in."""
    found = [exc, *([exc.__context__] if exc.__context__ is not None else [])]
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found.extend(_leaves(inner))
    return found
