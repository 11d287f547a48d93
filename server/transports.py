"""How the server meets its clients: stdio for the local operator, streamable HTTP with bearer
tokens for everyone else.

Over HTTP dockyard takes bearer tokens it minted itself and nothing else: it is no OAuth
authorization server and names none, so it serves no OAuth or OpenID metadata (those paths
answer 404). A request to the MCP endpoint without a bearer token gets a 401 with a plain
`WWW-Authenticate: Bearer` challenge (RFC 6750: no error code when no credentials were sent);
one whose token is refused gets `error="invalid_token"`. The body is a JSON-RPC error saying
what to do, so an MCP client shows it instead of a bare status.
"""

from __future__ import annotations

import json
import logging
import signal
import sys

import anyio
import uvicorn
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import INVALID_REQUEST
from starlette.authentication import AuthCredentials
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from dockyard.runtime.substrate.errors import AccessDeniedError
from dockyard.runtime.substrate.tokens import TokenService
from dockyard.tools._context import CallerToken

__all__ = ["BearerGate", "BearerTokens", "run_http", "run_stdio"]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 32 << 20  # a 16 MiB file write, base64-encoded, fits
_LOOPBACK = ("127.0.0.1", "localhost", "::1")
MCP_PATH = "/mcp"
_NO_TOKEN = (
    "dockyard needs a bearer token: send 'Authorization: Bearer <token>' (the operator mints one with "
    "`dockyard token mint`); this server takes only tokens it minted and offers no OAuth sign-in"
)


class BearerTokens:
    """The SDK's token verifier, backed by dockyard's tokens (attached once the engine is open)."""

    def __init__(self) -> None:
        self.tokens: TokenService | None = None

    async def verify_token(self, token: str) -> AccessToken | None:
        if self.tokens is None:
            return None
        try:
            identity = await self.tokens.verify(token)
        except AccessDeniedError as exc:
            log.info("bearer token refused: %s", exc)
            return None
        expires = self.tokens.expiry(identity.token_id)
        # An HTTP session belongs to the token that opened it: the SDK serves a session only to
        # requests whose principal (client id and subject) matches the one that created it.
        return CallerToken(
            token=token,
            client_id=identity.token_id or identity.user_id,
            subject=f"{identity.workspace_id}/{identity.user_id}",
            scopes=identity.scopes,
            expires_at=int(expires.timestamp()) if expires else None,
            identity=identity,
        )


class BearerGate:
    """Admits a request to the MCP endpoint only with a token dockyard accepts, and tells the
    endpoint who it is (the SDK's authenticated user, which also binds an HTTP session to the
    token that opened it). Other paths (/healthz, and 404s) pass as they are."""

    def __init__(self, app: ASGIApp, verifier: BearerTokens, path: str = MCP_PATH) -> None:
        self._app = AuthContextMiddleware(app)
        self._verifier = verifier
        self._path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].rstrip("/") != self._path:
            await self._app(scope, receive, send)
            return
        scheme, _, token = (Headers(scope=scope).get("authorization") or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            await _refuse(send, "Bearer", _NO_TOKEN)
            return
        access = await self._verifier.verify_token(token)
        if access is None:
            why = "the bearer token was refused: it is unknown to this server, revoked or expired; ask for a new one"
            await _refuse(send, f'Bearer error="invalid_token", error_description="{why}"', why)
            return
        scope["user"] = AuthenticatedUser(access)
        scope["auth"] = AuthCredentials(access.scopes)
        await self._app(scope, receive, send)


async def _refuse(send: Send, challenge: str, message: str) -> None:
    """A 401 with `challenge` and, as its body, a JSON-RPC error an MCP client shows as it is."""
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": {"code": INVALID_REQUEST, "message": message}}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"www-authenticate", challenge.encode()),
    ]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def run_stdio(server: MCPServer) -> None:
    """Serve one client over stdin/stdout until it disconnects (stdin closes) or the process is
    asked to stop (SIGTERM, SIGINT, SIGHUP): either way the engine closes as on any exit."""
    async with anyio.create_task_group() as tg:

        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async for signum in signals:
                    log.info("%s received: stopping", signal.Signals(signum).name)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(stop_on_signal)
        await server.run_stdio_async()
        tg.cancel_scope.cancel()


def _security(host: str, port: int) -> TransportSecuritySettings:
    """Requests must name this server as their Host, and browsers' Origins must be it too."""
    hosts = [f"{host}:{port}"] + ([f"{name}:{port}" for name in _LOOPBACK] if host in _LOOPBACK else [])
    hosts = [f"[{h.rsplit(':', 1)[0]}]:{port}" if h.count(":") > 1 else h for h in hosts]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=hosts,
        allowed_origins=[f"http://{h}" for h in hosts],
    )


async def run_http(server: MCPServer, bearer: BearerTokens, host: str, port: int) -> None:
    """Serve streamable HTTP at http://HOST:PORT/mcp (bearer tokens) and /healthz (open)."""

    @server.custom_route("/healthz", methods=["GET"])
    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        host=host,
        transport_security=_security(host, port),
        max_request_body_size=MAX_REQUEST_BYTES,
    )
    config = uvicorn.Config(BearerGate(app, bearer), host=host, port=port, log_level="warning", lifespan="on")
    print(f"dockyard: serving MCP at http://{host}:{port}/mcp", file=sys.stderr)
    await uvicorn.Server(config).serve()
