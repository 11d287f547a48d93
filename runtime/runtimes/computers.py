"""Computers: a real headless Chromium per agent, in its own container, driven with Playwright.

A computer is a runtime of a `computer` template claimed from the pool, so a claim hands over a
browser that is already running. The container has no network at all: the server reaches the
browser over the Chrome DevTools Protocol through a unix socket in a host directory (relayed to
a loopback port for Playwright, behind a bearer token only this server knows), and every request
the page makes is intercepted. A request to a preview that one of the same workspace's sandboxes
exposes (`sandbox_expose_port`) is fetched by the server with that preview's key and handed to
the page; anything else is refused. So a computer cannot reach another workspace's runtimes,
this machine's services (dockyard's own port included) or a cloud metadata address, and
`file://` and other schemes are refused before the browser sees them.

A computer is never reused: when it is destroyed, its container goes, and the pool starts a
fresh one, so no cookie, storage or history outlives its owner. Each computer is its own
browser; parallel agents never share one.
"""

from __future__ import annotations

import base64
import logging
import mimetypes
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import anyio
import anyio.abc
from playwright.async_api import Browser, BrowserContext, Page, Playwright, Route, async_playwright
from playwright.async_api import Error as PlaywrightError
from sqlmodel import Session, col, select

from dockyard.runtime.runtimes import relays
from dockyard.runtime.runtimes.pool import PoolManager
from dockyard.runtime.runtimes.ports import Exposed, cookie_name, without_key
from dockyard.runtime.runtimes.provision import Provisioner
from dockyard.runtime.runtimes.sandboxes import SandboxService, running_limits
from dockyard.runtime.substrate.actions import Action
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.errors import ComputerActionError, ComputerNotFoundError, InvalidRequestError
from dockyard.runtime.substrate.models import ComputerInfo, PageState
from dockyard.runtime.substrate.runs import tree_limit
from dockyard.runtime.substrate.settings import Identity, Settings
from dockyard.runtime.substrate.store import Computer, Runtime, RuntimeState, Sandbox, SandboxStatus, Store, utcnow
from dockyard.runtime.substrate.tokens import TokenService

__all__ = ["ComputerService"]

log = logging.getLogger(__name__)

_REF = re.compile(r"^[a-z]{0,3}\d{1,6}(?:[a-z]{1,3}\d{1,6})*$")
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


class ComputerService:
    """Claims, drives and ends computers."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        audit: AuditLog,
        pools: PoolManager,
        provisioner: Provisioner,
        sandboxes: SandboxService,
        tokens: TokenService,
    ) -> None:
        self._settings = settings
        self._tokens = tokens
        self._limits = settings.computers
        self._store = store
        self._audit = audit
        self._pools = pools
        self._provisioner = provisioner
        self._sandboxes = sandboxes
        self._ports = sandboxes.ports
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
                    await self._disconnect(computer_id)
                if self._playwright is not None:
                    await self._playwright.stop()

    # -- create and destroy ---------------------------------------------------------------

    async def create(
        self,
        who: Identity,
        *,
        template: str | None = None,
        width: int | None = None,
        height: int | None = None,
        ttl_s: int | None = None,
    ) -> ComputerInfo:
        """Claim a running browser from the pool and open a blank page in it."""
        name = template or self._limits.default_template
        async with self._audit.record(who, Action.COMPUTER_CREATE, template=name) as rec:
            tpl = self._settings.templates.get(name)
            if tpl is None or tpl.kind != "computer":
                known = [n for n, t in self._settings.templates.items() if t.kind == "computer"]
                raise InvalidRequestError(
                    f"unknown computer template '{name}'; computer templates: {', '.join(known) or 'none'}"
                )
            width, height = width or self._limits.width, height or self._limits.height
            ttl = ttl_s or self._limits.default_ttl_s
            if not 60 <= ttl <= self._limits.max_ttl_s:
                raise InvalidRequestError(f"ttl_s must be between 60 and {self._limits.max_ttl_s}")
            computer_id = f"cmp_{secrets.token_hex(8)}"
            rec.target = computer_id
            within_quotas = self._quota_check(who)
            await self._store.run(within_quotas)  # early, so a refused call claims nothing

            def bind(session: Session, runtime: Runtime) -> None:
                within_quotas(session)  # again, in the claim's own transaction
                runtime.sandbox_id = computer_id  # the claim's id: a computer's here
                session.add(
                    Computer(
                        id=computer_id,
                        runtime_id=runtime.id,
                        container_id=runtime.container_id or "",
                        template=name,
                        width=width,
                        height=height,
                        workspace_id=who.workspace_id,
                        project_id=who.project_id,
                        user_id=who.user_id,
                        run_id=who.run_id,
                        token_id=who.token_id,
                        expires_at=utcnow() + timedelta(seconds=ttl),
                    )
                )

            lease = await self._pools.claim(name, who.workspace_id, bind, network=tpl.network)
            row = await self._store.get(Computer, computer_id)
            assert row is not None
            try:
                await self._connect(row)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._end(row, "its browser could not be reached")
                raise
            rec.detail.update(
                runtime=lease.runtime.id, served="warm" if lease.warm else "cold", claim_ms=round(lease.claim_ms, 2)
            )
        return _info(row)

    async def destroy(self, who: Identity, computer_id: str) -> None:
        """End the computer: its container is removed, never handed to anyone else."""
        row = await self._owned(who, computer_id, Action.COMPUTER_DESTROY)
        await self._tokens.may_end(who, row.user_id, Action.COMPUTER_DESTROY, computer_id, "computer")
        async with self._audit.record(who, Action.COMPUTER_DESTROY, computer_id):
            await self._end(row, "destroyed by its owner")

    async def list(self, who: Identity) -> list[ComputerInfo]:
        rows = await self._store.run(
            lambda s: list(
                s.exec(
                    select(Computer)
                    .where(Computer.workspace_id == who.workspace_id, Computer.status == SandboxStatus.RUNNING)
                    .order_by(col(Computer.created_at))
                ).all()
            )
        )
        return [_info(row) for row in rows]

    async def reap_expired(self) -> int:
        """End computers past their expiry; returns how many."""
        rows = await self._store.run(
            lambda s: list(
                s.exec(
                    select(Computer).where(
                        Computer.status == SandboxStatus.RUNNING, col(Computer.expires_at) <= utcnow()
                    )
                ).all()
            )
        )
        for row in rows:
            owner = Identity(
                workspace_id=row.workspace_id, project_id=row.project_id, user_id=row.user_id, run_id=row.run_id
            )
            async with self._audit.record(owner, Action.COMPUTER_EXPIRE, row.id):
                await self._end(row, "its ttl expired")
        return len(rows)

    # -- driving the browser --------------------------------------------------------------

    async def navigate(self, who: Identity, computer_id: str, url: str) -> PageState:
        """Open `url` (a preview of one of the workspace's sandboxes, or about:blank)."""
        row = await self._owned(who, computer_id, Action.COMPUTER_NAVIGATE)
        url = without_key(url)  # the server shows a preview its key itself: the page's address and the audit stay clean
        async with self._audit.record(who, Action.COMPUTER_NAVIGATE, computer_id, url=url[:2000]) as rec:
            if url != "about:blank":
                scheme = urlsplit(url).scheme.lower()
                if scheme not in ("http", "https"):
                    raise InvalidRequestError(
                        f"blocked URL scheme '{scheme or url[:20]}'; a computer opens http URLs of your sandboxes' previews "
                        "(from sandbox_expose_port), or about:blank"
                    )
                if await self._preview(row.workspace_id, url) is None:
                    raise InvalidRequestError(
                        f"a computer cannot reach {urlsplit(url).netloc or url[:100]}: it opens only previews of your "
                        "workspace's sandboxes (the URLs sandbox_expose_port gives); other hosts, this machine's own "
                        "services and cloud metadata addresses are out of its reach"
                    )
            async with self._page(row) as page:
                try:
                    response = await page.goto(url, wait_until="load", timeout=self._timeout_ms)
                except PlaywrightError as exc:
                    raise ComputerActionError(f"could not load {url}: {_first_line(exc)}") from exc
                rec.detail["status"] = response.status if response is not None else None
                return await _state(page)

    async def snapshot(self, who: Identity, computer_id: str) -> PageState:
        """The page's accessibility tree with element refs (e.g. [ref=e5]) for click and type."""
        row = await self._owned(who, computer_id, Action.COMPUTER_SNAPSHOT)
        async with self._audit.record(who, Action.COMPUTER_SNAPSHOT, computer_id) as rec, self._page(row) as page:
            try:
                text = await page.aria_snapshot(mode="ai", timeout=self._timeout_ms)
            except PlaywrightError as exc:
                raise ComputerActionError(f"could not read the page: {_first_line(exc)}") from exc
            cap = self._limits.snapshot_cap_chars
            if len(text) > cap:
                text = text[:cap] + f"\n[... snapshot cut at {cap} characters; scroll or navigate to see the rest]"
            rec.detail["chars"] = len(text)
            return await _state(page, text)

    async def click(self, who: Identity, computer_id: str, ref: str) -> PageState:
        row = await self._owned(who, computer_id, Action.COMPUTER_CLICK)
        async with self._audit.record(who, Action.COMPUTER_CLICK, computer_id, ref=ref), self._page(row) as page:
            target = await self._element(page, ref)
            await self._act(lambda: target.click(timeout=self._timeout_ms), f"click {ref}")
            await _settle(page)
            return await _state(page)

    async def type(self, who: Identity, computer_id: str, ref: str, text: str, submit: bool) -> PageState:
        """Fill a field; the audit keeps the text unless the field is a password."""
        row = await self._owned(who, computer_id, Action.COMPUTER_TYPE)
        async with (
            self._audit.record(who, Action.COMPUTER_TYPE, computer_id, ref=ref, submit=submit) as rec,
            self._page(row) as page,
        ):
            target = await self._element(page, ref)
            secret = await self._act(lambda: target.evaluate("e => e.type === 'password'"), f"inspect {ref}")
            rec.detail["text"] = "••••••" if secret else text[:1000]
            await self._act(lambda: target.fill(text, timeout=self._timeout_ms), f"type into {ref}")
            if submit:
                await self._act(lambda: target.press("Enter", timeout=self._timeout_ms), f"submit {ref}")
                await _settle(page)
            return await _state(page)

    async def press(self, who: Identity, computer_id: str, key: str) -> PageState:
        row = await self._owned(who, computer_id, Action.COMPUTER_PRESS)
        async with self._audit.record(who, Action.COMPUTER_PRESS, computer_id, key=key), self._page(row) as page:
            await self._act(lambda: page.keyboard.press(key), f"press '{key}'")
            await _settle(page)
            return await _state(page)

    async def scroll(self, who: Identity, computer_id: str, dx: int, dy: int, ref: str | None) -> PageState:
        row = await self._owned(who, computer_id, Action.COMPUTER_SCROLL)
        async with (
            self._audit.record(who, Action.COMPUTER_SCROLL, computer_id, dx=dx, dy=dy, ref=ref),
            self._page(row) as page,
        ):
            if ref is not None:
                target = await self._element(page, ref)
                await self._act(lambda: target.scroll_into_view_if_needed(timeout=self._timeout_ms), f"scroll to {ref}")
            else:
                await self._act(lambda: page.mouse.wheel(dx, dy), "scroll")
            return await _state(page)

    async def wait_for(self, who: Identity, computer_id: str, text: str, timeout_s: float) -> PageState:
        """Wait until `text` shows on the page."""
        row = await self._owned(who, computer_id, Action.COMPUTER_WAIT_FOR)
        async with (
            self._audit.record(who, Action.COMPUTER_WAIT_FOR, computer_id, text=text[:200]),
            self._page(row) as page,
        ):
            try:
                await page.get_by_text(text).first.wait_for(state="visible", timeout=timeout_s * 1000)
            except PlaywrightError as exc:
                raise ComputerActionError(f"'{text[:100]}' did not show on the page within {timeout_s:g} s") from exc
            return await _state(page)

    async def upload(self, who: Identity, computer_id: str, ref: str, sandbox_id: str, path: str) -> PageState:
        """Put a file from one of the caller's sandboxes into a file input of the page."""
        row = await self._owned(who, computer_id, Action.COMPUTER_UPLOAD)
        async with self._audit.record(
            who, Action.COMPUTER_UPLOAD, computer_id, ref=ref, sandbox_id=sandbox_id, path=path
        ) as rec:
            file = await self._sandboxes.read_file(who, sandbox_id, path, "base64", None)
            if file.truncated:
                raise InvalidRequestError(
                    f"{path} is {file.size} bytes, over the {self._settings.sandbox.read_cap_bytes}-byte read cap"
                )
            rec.detail["size"] = file.size
            name = PurePosixPath(file.path).name
            payload = {
                "name": name,
                "mimeType": mimetypes.guess_type(name)[0] or "application/octet-stream",
                "buffer": base64.b64decode(file.content),
            }
            async with self._page(row) as page:
                target = await self._element(page, ref)
                await self._act(
                    lambda: target.set_input_files(payload, timeout=self._timeout_ms), f"upload {name} into {ref}"
                )
                return await _state(page)

    async def screenshot(self, who: Identity, computer_id: str, full_page: bool) -> bytes:
        """A PNG of the viewport, or of the whole page."""
        row = await self._owned(who, computer_id, Action.COMPUTER_SCREENSHOT)
        async with (
            self._audit.record(who, Action.COMPUTER_SCREENSHOT, computer_id, full_page=full_page) as rec,
            self._page(row) as page,
        ):
            png: bytes = await self._act(
                lambda: page.screenshot(full_page=full_page, type="png", timeout=self._timeout_ms * 3),
                "take a screenshot",
            )
            rec.detail["bytes"] = len(png)
            return png

    # -- the connection to a browser --------------------------------------------------------

    @property
    def _timeout_ms(self) -> float:
        return self._limits.action_timeout_s * 1000

    def _page(self, row: Computer) -> _PageLease:
        return _PageLease(self, row)

    async def _connected(self, row: Computer) -> _Live:
        live = self._live.get(row.id)
        if live is not None and live.browser.is_connected():
            return live
        lock = self._connecting.setdefault(row.id, anyio.Lock())
        async with lock:
            live = self._live.get(row.id)
            if live is None or not live.browser.is_connected():
                await self._disconnect(row.id)
                live = await self._connect(row)
        return live

    async def _connect(self, row: Computer) -> _Live:
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
            raise ComputerActionError(f"the computer's browser did not answer: {_first_line(exc)}") from exc
        live = _Live(browser, context, page, relay)
        self._live[row.id] = live
        return live

    async def _disconnect(self, computer_id: str) -> None:
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
            exposed = await self._preview(workspace_id, url)
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
            fetched = await route.fetch(headers=headers, max_redirects=0, timeout=self._timeout_ms)
            await route.fulfill(response=fetched)
        except PlaywrightError as exc:
            log.debug("request %s from a computer failed: %s", url, exc)
            try:
                await route.abort("connectionrefused")
            except PlaywrightError:
                pass

    async def _preview(self, workspace_id: str, url: str) -> Exposed | None:
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

    async def _element(self, page: Page, ref: str) -> Any:
        if not _REF.match(ref):
            raise InvalidRequestError(
                f"'{ref[:40]}' is not an element ref; refs look like e12 and come from computer_snapshot"
            )
        target = page.locator(f"aria-ref={ref}")
        try:
            count = await target.count()
        except PlaywrightError:
            count = 0
        if count == 0:
            raise ComputerActionError(f"element ref {ref} is not on the page any more; take a new computer_snapshot")
        return target

    async def _act(self, action: Callable[[], Any], what: str) -> Any:
        try:
            return await action()
        except PlaywrightError as exc:
            raise ComputerActionError(f"could not {what}: {_first_line(exc)}") from exc

    # -- ownership --------------------------------------------------------------------------

    async def _owned(self, who: Identity, computer_id: str, action: Action) -> Computer:
        """The caller's live computer; another workspace's is unknown to them (and audited)."""
        row = await self._store.get(Computer, computer_id)
        if row is None or row.workspace_id != who.workspace_id or who.sandbox_id is not None:
            await self._audit.append(
                who,
                action,
                target=computer_id,
                outcome="denied",
                detail={"error": "no such computer in the caller's reach", "token_id": who.token_id},
            )
            raise ComputerNotFoundError(computer_id)
        if row.status != SandboxStatus.RUNNING:
            raise ComputerNotFoundError(computer_id, f"computer '{computer_id}' is {row.status}: {row.end_reason}")
        runtime = await self._store.get(Runtime, row.runtime_id)
        if runtime is None or runtime.state != RuntimeState.CLAIMED or runtime.sandbox_id != row.id:
            await self._mark_lost(row)
            raise ComputerNotFoundError(
                computer_id, f"computer '{computer_id}' was lost: its container is gone; create another"
            )
        return row

    async def _mark_lost(self, row: Computer) -> None:
        await self._disconnect(row.id)

        def lose(session: Session) -> None:
            fresh = session.get(Computer, row.id)
            if fresh is not None and fresh.status == SandboxStatus.RUNNING:
                fresh.status, fresh.ended_at, fresh.end_reason = SandboxStatus.LOST, utcnow(), "its container is gone"
                session.add(fresh)

        await self._store.run(lose)

    async def _end(self, row: Computer, reason: str) -> None:
        await self._disconnect(row.id)

        def close(session: Session, _runtime: Runtime | None) -> None:
            fresh = session.get(Computer, row.id)
            if fresh is not None and fresh.status == SandboxStatus.RUNNING:
                fresh.status, fresh.ended_at, fresh.end_reason = SandboxStatus.DESTROYED, utcnow(), reason
                session.add(fresh)

        await self._pools.release(row.runtime_id, close, reason)
        await self._store.run(lambda s: close(s, None))  # if the runtime was already gone
        self._connecting.pop(row.id, None)

    def _quota_check(self, who: Identity) -> Callable[[Session], None]:
        quotas = self._settings.quotas
        same_workspace = Computer.workspace_id == who.workspace_id
        limits = [
            ("tenant_computers", quotas.tenant_computers, None),
            ("workspace_computers", quotas.workspace_computers, same_workspace),
            ("user_computers", quotas.user_computers, same_workspace & (Computer.user_id == who.user_id)),
        ]
        within = running_limits(Computer, limits, "computers")
        within_runs = tree_limit(Computer, "run_computers", quotas.run_computers, who, "computers")

        def check(session: Session) -> None:
            within(session)
            within_runs(session)

        return check


class _PageLease:
    """`async with`: the computer's page, one action at a time."""

    def __init__(self, service: ComputerService, row: Computer) -> None:
        self._service = service
        self._row = row
        self._live: _Live | None = None

    async def __aenter__(self) -> Page:
        self._live = await self._service._connected(self._row)  # noqa: SLF001 - the service's helper for its own pages
        await self._live.lock.acquire()
        return self._live.page

    async def __aexit__(self, *exc: object) -> None:
        assert self._live is not None
        self._live.lock.release()


async def _settle(page: Page) -> None:
    """Give an action's navigation, if it started one, a moment to load."""
    try:
        await page.wait_for_load_state("load", timeout=3000)
    except PlaywrightError:
        pass


async def _state(page: Page, snapshot: str | None = None) -> PageState:
    try:
        title = await page.title()
    except PlaywrightError:
        title = ""
    return PageState(url=page.url, title=title, snapshot=snapshot)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _info(row: Computer) -> ComputerInfo:
    return ComputerInfo(
        computer_id=row.id,
        template=row.template,
        width=row.width,
        height=row.height,
        created_at=row.created_at,
        expires_at=row.expires_at,
    )
