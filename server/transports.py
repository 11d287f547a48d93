"""How the server meets its clients: stdio for the local operator, streamable HTTP with bearer
tokens for everyone else."""

from __future__ import annotations

import logging
import signal
import sys

import anyio
import uvicorn
from mcp.server.auth.provider import AccessToken
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.responses import JSONResponse

from dockyard.runtime.substrate.errors import AccessDeniedError
from dockyard.runtime.substrate.tokens import TokenService
from dockyard.tools._context import CallerToken

__all__ = ["BearerTokens", "run_http", "run_stdio"]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 32 << 20  # a 16 MiB file write, base64-encoded, fits
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


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


async def run_http(server: MCPServer, host: str, port: int) -> None:
    """Serve streamable HTTP at http://HOST:PORT/mcp (bearer tokens) and /healthz (open)."""

    @server.custom_route("/healthz", methods=["GET"])
    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = server.streamable_http_app(
        host=host, transport_security=_security(host, port), max_request_body_size=MAX_REQUEST_BYTES
    )
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    print(f"dockyard: serving MCP at http://{host}:{port}/mcp", file=sys.stderr)
    await uvicorn.Server(config).serve()
