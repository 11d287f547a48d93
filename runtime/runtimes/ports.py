"""Exposed ports: a listener on 127.0.0.1 of this machine relays each connection into the
sandbox through its helper, so previews work even for sandboxes with no network at all.

Any local user can connect to 127.0.0.1, so each preview has its own secret and a connection
is relayed only once its first request shows it (see `relays.py`): as a cookie
`dockyard_preview_<host port>`, as `Authorization: Bearer <secret>`, or as the link's query
parameter `dockyard_key`, which is answered with a redirect to the same URL without it that
sets the cookie. The link is what `sandbox_expose_port` gives:
`http://127.0.0.1:<host port>/?dockyard_key=<secret>`.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from dataclasses import dataclass, replace
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc

from dockyard.runtime.runtimes import relays
from dockyard.runtime.runtimes.relays import RequestHead
from dockyard.runtime.substrate.docker import STDOUT, DockerBackend

__all__ = ["LINK_PARAM", "Exposed", "PortForwarder", "cookie_name", "without_key"]

log = logging.getLogger(__name__)

LINK_PARAM = "dockyard_key"
_HELPER_REFUSED = b'{"ok": false'
_COOKIE_PREFIX = "dockyard_preview_"


@dataclass(frozen=True)
class Exposed:
    """One exposed port: where it listens on this machine and the secret it asks for."""

    container_id: str
    port: int
    host_port: int
    secret: str
    scope: anyio.CancelScope

    @property
    def url(self) -> str:
        """The link a person opens: it carries the secret once, then the cookie does."""
        return f"http://127.0.0.1:{self.host_port}/?{LINK_PARAM}={self.secret}"


def cookie_name(host_port: int) -> str:
    """The cookie that admits a browser to one preview (cookies are per host, not per port)."""
    return f"{_COOKIE_PREFIX}{host_port}"


def without_key(url: str) -> str:
    """`url` without the link's secret parameter, every other part as it was."""
    parts = urlsplit(url)
    if LINK_PARAM not in parts.query:
        return url
    kept = [pair for pair in parts.query.split("&") if pair and pair.partition("=")[0] != LINK_PARAM]
    return urlunsplit(parts._replace(query="&".join(kept)))


class PortForwarder:
    """Owns the host listeners of every exposed sandbox port."""

    def __init__(self, docker: DockerBackend, user: str) -> None:
        self._docker = docker
        self._user = user
        self._task_group: anyio.abc.TaskGroup | None = None
        self._open: dict[str, dict[int, Exposed]] = {}

    def attach(self, task_group: anyio.abc.TaskGroup) -> None:
        self._task_group = task_group

    def ports(self, container_id: str) -> dict[int, Exposed]:
        """Sandbox port -> its listener, for one container."""
        return dict(self._open.get(container_id, {}))

    def exposed(self, host_port: int) -> Exposed | None:
        """The exposed port a loopback port is, if it is one of ours."""
        for ports in self._open.values():
            for exposed in ports.values():
                if exposed.host_port == host_port:
                    return exposed
        return None

    async def open(self, container_id: str, port: int) -> Exposed:
        """Listen on a free loopback port for `port` of the container, behind a new secret."""
        existing = self._open.get(container_id, {}).get(port)
        if existing is not None:
            return existing
        assert self._task_group is not None, (
            "PortForwarder.open needs attach() first"
        )  # the engine attaches it at start
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        host_port = listener.extra(anyio.abc.SocketAttribute.local_port)
        secret = secrets.token_urlsafe(24)
        relay = _IntoSandbox(self._docker, self._user, container_id, port)
        scope = await self._task_group.start(relays.serve, listener, _preview_gate(secret, host_port), relay)
        exposed = Exposed(container_id, port, host_port, secret, scope)
        self._open.setdefault(container_id, {})[port] = exposed
        return exposed

    def close(self, container_id: str) -> None:
        """Stop every listener of one container."""
        for exposed in self._open.pop(container_id, {}).values():
            exposed.scope.cancel()


def _preview_gate(secret: str, host_port: int) -> relays.Gate:
    """Admit a request that shows the preview's secret; the secret itself goes no further."""
    cookie = cookie_name(host_port)

    def holds(value: str | None) -> bool:
        return value is not None and hmac.compare_digest(value.encode(), secret.encode())

    def judge(head: RequestHead) -> RequestHead | bytes:
        parts = urlsplit(head.target)
        linked = [v for k, _, v in (p.partition("=") for p in parts.query.split("&")) if k == LINK_PARAM]
        if linked:
            if not holds(linked[0]):
                return relays.answer(403, "Forbidden", "wrong preview key\n")
            # One leading slash: "//host/..." would send the browser to another host.
            back = urlunsplit(("", "", "/" + parts.path.lstrip("/"), urlsplit(without_key(head.target)).query, ""))
            return relays.answer(
                303,
                "See Other",
                "",
                f"Location: {back}",
                f"Set-Cookie: {cookie}={secret}; Path=/; HttpOnly; SameSite=Strict",
            )
        shown = [_cookies(head).get(cookie), relays.bearer_of(head)]
        if not any(shown):
            return relays.answer(
                401,
                "Unauthorized",
                "this preview needs its key: open the URL sandbox_expose_port gave\n",
                'WWW-Authenticate: Bearer realm="dockyard preview"',
            )
        if not any(holds(value) for value in shown):
            return relays.answer(403, "Forbidden", "wrong preview key\n")
        return _strip(head, secret)

    return judge


def _cookies(head: RequestHead) -> dict[str, str]:
    pairs = (pair.strip().partition("=") for value in head.values("cookie") for pair in value.split(";"))
    return {name: value for name, _, value in pairs if name}


def _strip(head: RequestHead, secret: str) -> RequestHead:
    """The head without the preview cookies and without a bearer header holding the secret, so
    the sandbox does not see a preview's key in the request that opened the connection."""

    # Only a connection's first request passes the gate, and a browser sends every preview's
    # cookie to every 127.0.0.1 port: so the connection ends after this request's answer
    # (each next request comes on a new connection, through the gate), unless it upgrades.
    upgrading = bool(head.values("upgrade"))

    def keep(name: str, value: str) -> bool:
        scheme, _, token = value.strip().partition(" ")
        is_key = (
            name.lower() == "authorization"
            and scheme.lower() == "bearer"
            and hmac.compare_digest(token.strip().encode(), secret.encode())
        )
        ends = not upgrading and name.lower() in ("connection", "keep-alive")
        return not is_key and not ends and name.lower() != "cookie"

    others = "; ".join(
        pair.strip()
        for value in head.values("cookie")
        for pair in value.split(";")
        if pair.strip() and not pair.strip().startswith(_COOKIE_PREFIX)
    )
    kept = head.without(keep)
    added = ((("Cookie", others),) if others else ()) + ((("Connection", "close"),) if not upgrading else ())
    return replace(kept, headers=(*kept.headers, *added))


class _IntoSandbox:
    """Relays an admitted connection to a port inside a sandbox, through its helper."""

    def __init__(self, docker: DockerBackend, user: str, container_id: str, port: int) -> None:
        self._docker, self._user, self._container_id, self._port = docker, user, container_id, port

    async def __call__(self, client: anyio.abc.SocketStream, first: bytes) -> None:
        async with self._docker.exec_attached(
            self._container_id, ["dockyard-helper", "connect", str(self._port)], user=self._user
        ) as channel:
            async with anyio.create_task_group() as tg:

                async def upstream() -> None:
                    try:
                        await channel.send(first)
                        async for data in client:
                            await channel.send(data)
                    finally:
                        with anyio.CancelScope(shield=True):
                            await channel.close_stdin()

                tg.start_soon(upstream)
                answered = False
                async for kind, chunk in channel.frames():
                    if kind != STDOUT:
                        continue
                    if not answered and chunk.startswith(_HELPER_REFUSED):
                        # The helper could not connect (no HTTP server answers with this): the
                        # client sees the connection closed, as it would on a closed port.
                        break
                    answered = True
                    await client.send(chunk)
                tg.cancel_scope.cancel()
