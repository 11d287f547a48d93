"""The server's connections to computers' browsers, over the Chrome DevTools Protocol.

A computer's container has no network at all: the server reaches its browser through a unix
socket in a host directory, relayed to a loopback port for Playwright behind a bearer token
only this server knows. Every request a page makes is intercepted (`_route`): a request to a
preview that one of the same workspace's sandboxes exposes (`sandbox_expose_port`) is fetched
by the server with that preview's key and handed to the page; anything else is refused.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import anyio
import anyio.abc
from playwright.async_api import Browser, BrowserContext, Page, Playwright, Route, async_playwright
from playwright.async_api import Error as PlaywrightError
from sqlmodel import select

from dockyard.runtime.runtimes import relays
from dockyard.runtime.runtimes.ports import Exposed, PortForwarder, cookie_name
from dockyard.runtime.runtimes.provision import Provisioner
from dockyard.runtime.substrate.errors import ComputerActionError
from dockyard.runtime.substrate.settings import ComputerSettings
from dockyard.runtime.substrate.store import Computer, Sandbox, SandboxStatus, Store

__all__ = ["PlaywrightBrowsers", "first_line"]

log = logging.getLogger(__name__)

_PREVIEW_HOSTS = ("127.0.0.1", "localhost")
_CONNECT_TIMEOUT_MS = 15_000


@dataclass
class _Live:
    """The server's connection to one computer's browser."""

    browser: Browser
    context: BrowserContext
    page: Page
    relay: anyio.CancelScope
    lock: anyio.Lock = field(default_factory=anyio.Lock)


class PlaywrightBrowsers:
    """Connects to computers' browsers, hands out their pages one action at a time, and
    drops the connections."""

    def __init__(self, limits: ComputerSettings, store: Store, provisioner: Provisioner, ports: PortForwarder) -> None:
        self._limits = limits
        self._store = store
        self._provisioner = provisioner
        self._ports = ports
        self._live: dict[str, _Live] = {}
        self._connecting: dict[str, anyio.Lock] = {}
        self._playwright: Playwright | None = None
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Hold the CDP relays; on the way out, drop every browser connection (the computers
        themselves keep running and are adopted at the next start)."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                task_status.started()
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                for computer_id in list(self._live):
                    await self.disconnect(computer_id)
                if self._playwright is not None:
                    await self._playwright.stop()

    @property
    def timeout_ms(self) -> float:
        """How long one browser action may take (computers.action_timeout_s), in ms."""
        return self._limits.action_timeout_s * 1000

    @asynccontextmanager
    async def page(self, row: Computer) -> AsyncIterator[Page]:
        """`async with`: the computer's page, one action at a time (connecting again if the
        connection dropped)."""
        live = await self._connected(row)
        async with live.lock:
            yield live.page

    async def _connected(self, row: Computer) -> _Live:
        live = self._live.get(row.id)
        if live is not None and live.browser.is_connected():
            return live
        lock = self._connecting.setdefault(row.id, anyio.Lock())
        async with lock:
            live = self._live.get(row.id)
            if live is None or not live.browser.is_connected():
                await self.disconnect(row.id)
                live = await self._open(row)
        return live

    async def connect(self, row: Computer) -> None:
        """Reach the computer's browser and open its page (at a computer's creation)."""
        await self._open(row)

    async def _open(self, row: Computer) -> _Live:
        """Reach the computer's browser over CDP and open its page, with every request routed
        through `_route`."""
        assert self._tg is not None, "the computer service is not running"
        if self._playwright is None:
            self._playwright = await async_playwright().start()
        socket = self._provisioner.cdp_socket(row.runtime_id)
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        # Any local user can connect to the loopback relay: it admits only this server's token,
        # which Playwright sends on the /json/version request and on the WebSocket upgrade.
        token = secrets.token_urlsafe(24)
        relay = await self._tg.start(relays.serve, listener, relays.bearer_gate(token), relays.to_unix(socket))
        try:
            browser = await self._playwright.chromium.connect_over_cdp(
                f"http://127.0.0.1:{port}", timeout=_CONNECT_TIMEOUT_MS, headers={"Authorization": f"Bearer {token}"}
            )
            context = await browser.new_context(
                viewport={"width": row.width, "height": row.height}, service_workers="block"
            )
            await context.route("**/*", lambda route: self._route(row.workspace_id, context, route))
            page = await context.new_page()
        except PlaywrightError as exc:
            relay.cancel()
            raise ComputerActionError(f"the computer's browser did not answer: {first_line(exc)}") from exc
        live = _Live(browser, context, page, relay)
        self._live[row.id] = live
        return live

    async def disconnect(self, computer_id: str) -> None:
        """Close the connection to the computer's browser, if there is one."""
        live = self._live.pop(computer_id, None)
        if live is None:
            return
        try:
            with anyio.move_on_after(5):
                await live.browser.close()
        except PlaywrightError:
            pass
        live.relay.cancel()

    async def _route(self, workspace_id: str, context: BrowserContext, route: Route) -> None:
        """Serve a page's request if it is for one of the workspace's previews; refuse the rest."""
        url = route.request.url
        try:
            exposed = await self.preview(workspace_id, url)
            if exposed is None:
                await route.abort("blockedbyclient")
                return
            # The browser's Cookie header may predate this preview's key, so it is left out and the
            # fetch takes the context's cookies instead: the key among them, set again each time
            # so a page's own Set-Cookie cannot displace it.
            await context.add_cookies(
                [
                    {
                        "name": cookie_name(exposed.host_port),
                        "value": exposed.secret,
                        "httpOnly": True,
                        "url": f"http://{urlsplit(url).hostname}:{exposed.host_port}/",
                        "sameSite": "Strict",
                    }
                ]
            )
            headers = {name: value for name, value in route.request.headers.items() if name.lower() != "cookie"}
            # Redirects come back to the page, so each hop is checked here again.
            fetched = await route.fetch(headers=headers, max_redirects=0, timeout=self.timeout_ms)
            await route.fulfill(response=fetched)
        except PlaywrightError as exc:
            log.debug("request %s from a computer failed: %s", url, exc)
            try:
                await route.abort("connectionrefused")
            except PlaywrightError:
                pass

    async def preview(self, workspace_id: str, url: str) -> Exposed | None:
        """The exposed port `url` is, if it is one of `workspace_id`'s sandboxes'."""
        parts = urlsplit(url)
        if parts.scheme != "http" or (parts.hostname or "") not in _PREVIEW_HOSTS or parts.port is None:
            return None
        exposed = self._ports.exposed(parts.port)
        if exposed is None:
            return None
        sandbox = await self._store.run(
            lambda s: s.exec(
                select(Sandbox).where(
                    Sandbox.container_id == exposed.container_id, Sandbox.status == SandboxStatus.RUNNING
                )
            ).first()
        )
        return exposed if sandbox is not None and sandbox.workspace_id == workspace_id else None

    def forget(self, computer_id: str) -> None:
        """Drop what is kept for an ended computer's connecting."""
        self._connecting.pop(computer_id, None)


def first_line(exc: Exception) -> str:
    """The first line of a Playwright error, short enough for a model to read."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
