"""A computer's page, driven: navigate, read, click, type, press, scroll, wait, upload and
take screenshots, one action at a time, each audited.

A page opens only previews of the caller's workspace's sandboxes (or about:blank); the
connection and its request filter are in `browsers.py`, the computer's lifecycle in
`computers.py`.
"""

from __future__ import annotations

import base64
import mimetypes
import re
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page

from dockyard.runtime.runtimes.browsers import PlaywrightBrowsers, first_line
from dockyard.runtime.runtimes.computers import ComputerService
from dockyard.runtime.runtimes.outputs import json_chars
from dockyard.runtime.runtimes.ports import without_key
from dockyard.runtime.runtimes.sandboxes import SandboxService
from dockyard.runtime.substrate.actions import Action
from dockyard.runtime.substrate.audit import AuditLog
from dockyard.runtime.substrate.errors import ComputerActionError, InvalidRequestError
from dockyard.runtime.substrate.models import PageState
from dockyard.runtime.substrate.settings import Identity, Settings

__all__ = ["PageService"]

_REF = re.compile(r"^[a-z]{0,3}\d{1,6}(?:[a-z]{1,3}\d{1,6})*$")


class PageService:
    """Drives the page of a computer the caller owns."""

    def __init__(
        self,
        settings: Settings,
        audit: AuditLog,
        computers: ComputerService,
        browsers: PlaywrightBrowsers,
        sandboxes: SandboxService,
    ) -> None:
        self._settings = settings
        self._limits = settings.computers
        self._audit = audit
        self._computers = computers
        self._browsers = browsers
        self._sandboxes = sandboxes

    async def navigate(self, who: Identity, computer_id: str, url: str) -> PageState:
        """Open `url` (a preview of one of the workspace's sandboxes, or about:blank)."""
        row = await self._computers.owned(who, computer_id, Action.COMPUTER_NAVIGATE)
        url = without_key(url)  # the server shows a preview its key itself: the page's address and the audit stay clean
        async with self._audit.record(who, Action.COMPUTER_NAVIGATE, computer_id, url=url[:2000]) as rec:
            if url != "about:blank":
                scheme = urlsplit(url).scheme.lower()
                if scheme not in ("http", "https"):
                    raise InvalidRequestError(
                        f"blocked URL scheme '{scheme or url[:20]}'; a computer opens http URLs of your sandboxes' previews "
                        "(from sandbox_expose_port), or about:blank"
                    )
                if await self._browsers.preview(row.workspace_id, url) is None:
                    raise InvalidRequestError(
                        f"a computer cannot reach {urlsplit(url).netloc or url[:100]}: it opens only previews of your "
                        "workspace's sandboxes (the URLs sandbox_expose_port gives); other hosts, this machine's own "
                        "services and cloud metadata addresses are out of its reach"
                    )
            async with self._browsers.page(row) as page:
                try:
                    response = await page.goto(url, wait_until="load", timeout=self._browsers.timeout_ms)
                except PlaywrightError as exc:
                    raise ComputerActionError(f"could not load {url}: {first_line(exc)}") from exc
                rec.detail["status"] = response.status if response is not None else None
                return await _state(page)

    async def snapshot(
        self, who: Identity, computer_id: str, *, ref: str | None = None, offset: int = 0, budget: int | None = None
    ) -> PageState:
        """The page's accessibility tree (or the subtree of element `ref`) with element refs
        (e.g. [ref=e5]) for click and type: from `offset`, as many whole lines as fit `budget`
        characters (at most the result budget)."""
        row = await self._computers.owned(who, computer_id, Action.COMPUTER_SNAPSHOT)
        limit = min(budget or self._settings.results.budget_chars, self._settings.results.budget_chars)
        async with (
            self._audit.record(who, Action.COMPUTER_SNAPSHOT, computer_id, ref=ref, offset=offset) as rec,
            self._browsers.page(row) as page,
        ):
            scope = page if ref is None else await self._element(page, ref)
            try:
                text = await scope.aria_snapshot(mode="ai", timeout=self._browsers.timeout_ms)
            except PlaywrightError as exc:
                raise ComputerActionError(f"could not read the page: {first_line(exc)}") from exc
            text = text[: self._limits.snapshot_cap_chars]
            if offset > len(text):
                raise InvalidRequestError(f"offset {offset} is past the snapshot's {len(text)} characters")
            shown = snapshot_page(text, offset, limit)
            rec.detail["chars"] = len(text)
            state = await _state(page)
            end = offset + len(shown)
            return state.model_copy(
                update={
                    "snapshot": shown
                    + (
                        f"\n[... snapshot cut: {len(text) - end} more characters; pass offset={end}]"
                        if end < len(text)
                        else ""
                    ),
                    "snapshot_chars": len(text),
                    "offset": offset,
                    "has_more": end < len(text),
                    "next_offset": end if end < len(text) else None,
                }
            )

    async def click(self, who: Identity, computer_id: str, ref: str) -> PageState:
        row = await self._computers.owned(who, computer_id, Action.COMPUTER_CLICK)
        async with (
            self._audit.record(who, Action.COMPUTER_CLICK, computer_id, ref=ref),
            self._browsers.page(row) as page,
        ):
            target = await self._element(page, ref)
            await self._act(lambda: target.click(timeout=self._browsers.timeout_ms), f"click {ref}")
            await _settle(page)
            return await _state(page)

    async def type(self, who: Identity, computer_id: str, ref: str, text: str, submit: bool) -> PageState:
        """Fill a field; the audit keeps the text unless the field is a password."""
        row = await self._computers.owned(who, computer_id, Action.COMPUTER_TYPE)
        async with (
            self._audit.record(who, Action.COMPUTER_TYPE, computer_id, ref=ref, submit=submit) as rec,
            self._browsers.page(row) as page,
        ):
            target = await self._element(page, ref)
            secret = await self._act(lambda: target.evaluate("e => e.type === 'password'"), f"inspect {ref}")
            rec.detail["text"] = "••••••" if secret else text[:1000]
            await self._act(lambda: target.fill(text, timeout=self._browsers.timeout_ms), f"type into {ref}")
            if submit:
                await self._act(lambda: target.press("Enter", timeout=self._browsers.timeout_ms), f"submit {ref}")
                await _settle(page)
            return await _state(page)

    async def press(self, who: Identity, computer_id: str, key: str) -> PageState:
        row = await self._computers.owned(who, computer_id, Action.COMPUTER_PRESS)
        async with (
            self._audit.record(who, Action.COMPUTER_PRESS, computer_id, key=key),
            self._browsers.page(row) as page,
        ):
            await self._act(lambda: page.keyboard.press(key), f"press '{key}'")
            await _settle(page)
            return await _state(page)

    async def scroll(self, who: Identity, computer_id: str, dx: int, dy: int, ref: str | None) -> PageState:
        row = await self._computers.owned(who, computer_id, Action.COMPUTER_SCROLL)
        async with (
            self._audit.record(who, Action.COMPUTER_SCROLL, computer_id, dx=dx, dy=dy, ref=ref),
            self._browsers.page(row) as page,
        ):
            if ref is not None:
                target = await self._element(page, ref)
                await self._act(
                    lambda: target.scroll_into_view_if_needed(timeout=self._browsers.timeout_ms), f"scroll to {ref}"
                )
            else:
                await self._act(lambda: page.mouse.wheel(dx, dy), "scroll")
            return await _state(page)

    async def wait_for(self, who: Identity, computer_id: str, text: str, timeout_s: float) -> PageState:
        """Wait until `text` shows on the page."""
        row = await self._computers.owned(who, computer_id, Action.COMPUTER_WAIT_FOR)
        async with (
            self._audit.record(who, Action.COMPUTER_WAIT_FOR, computer_id, text=text[:200]),
            self._browsers.page(row) as page,
        ):
            try:
                await page.get_by_text(text).first.wait_for(state="visible", timeout=timeout_s * 1000)
            except PlaywrightError as exc:
                raise ComputerActionError(f"'{text[:100]}' did not show on the page within {timeout_s:g} s") from exc
            return await _state(page)

    async def upload(self, who: Identity, computer_id: str, ref: str, sandbox_id: str, path: str) -> PageState:
        """Put a file from one of the caller's sandboxes into a file input of the page."""
        row = await self._computers.owned(who, computer_id, Action.COMPUTER_UPLOAD)
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
            async with self._browsers.page(row) as page:
                target = await self._element(page, ref)
                await self._act(
                    lambda: target.set_input_files(payload, timeout=self._browsers.timeout_ms),
                    f"upload {name} into {ref}",
                )
                return await _state(page)

    async def screenshot(self, who: Identity, computer_id: str, full_page: bool) -> bytes:
        """A PNG of the viewport, or of the whole page."""
        row = await self._computers.owned(who, computer_id, Action.COMPUTER_SCREENSHOT)
        async with (
            self._audit.record(who, Action.COMPUTER_SCREENSHOT, computer_id, full_page=full_page) as rec,
            self._browsers.page(row) as page,
        ):
            png: bytes = await self._act(
                lambda: page.screenshot(full_page=full_page, type="png", timeout=self._browsers.timeout_ms * 3),
                "take a screenshot",
            )
            rec.detail["bytes"] = len(png)
            return png

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
            raise ComputerActionError(f"could not {what}: {first_line(exc)}") from exc


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


def snapshot_page(text: str, offset: int, limit: int) -> str:
    """The part of `text` from `offset` that fits `limit` characters as JSON counts them (less
    the cut marker), ending on a whole line when there is one."""
    room = max(limit - 100, 100)
    part = text[offset : offset + room]
    while json_chars(part) > room:
        part = part[: len(part) * room // json_chars(part) - 1]
    if offset + len(part) < len(text) and "\n" in part:
        part = part[: part.rindex("\n") + 1]
    return part
