"""File operations confined to a sandbox's /workspace.

Paths are checked twice: here, before anything runs (no `..`, no absolute path elsewhere, only
printable UTF-8), and inside the sandbox by the supervisor, which works with the sandbox user's
rights (or a member's own user's, in a shared sandbox) and walks the path one name at a time
without letting the kernel follow a symlink; a symlink on the way is followed only to a place
inside /workspace (see `confined.py` in the sandbox image), so a process that swaps files
meanwhile cannot lead a tool out.
"""

from __future__ import annotations

import base64
import binascii
import unicodedata
from typing import Any

from dockyard.config.images.sandbox import protocol
from dockyard.runtime.runtimes.outputs import json_chars
from dockyard.runtime.runtimes.supervisor import Frame, Supervisors
from dockyard.runtime.substrate.errors import (
    EncodingError,
    InvalidRequestError,
    NotFoundError,
    PathOutsideWorkspaceError,
    SizeLimitError,
)
from dockyard.runtime.substrate.models import FileContent, FileEntry, FileListing, FileReadResult, FileWritten

__all__ = ["WORKSPACE", "FileOps", "decode_content", "fit_listing", "shown", "workspace_path"]

WORKSPACE = "/workspace"
_DEADLINE_S = 60.0


def shown(text: str) -> str:
    """`text` safe to print: control characters and lone surrogates as \\xNN or \\uNNNN escapes."""
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, as Python decodes file names
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF or unicodedata.category(char) == "Cc":
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def workspace_path(path: str) -> str:
    """The caller's path as a clean path relative to /workspace ('.' for the root), or raise."""
    if shown(path) != path:
        raise InvalidRequestError(
            f"'{shown(path)}' contains a control character (such as a newline) or a lone surrogate; paths are "
            "printable UTF-8 under /workspace (a file with such a name can be renamed with sandbox_exec)"
        )
    rel = path.strip()
    if rel.startswith("/"):
        if rel != WORKSPACE and not rel.startswith(WORKSPACE + "/"):
            raise PathOutsideWorkspaceError(
                f"'{path}' is outside /workspace; use a path relative to /workspace or one under it"
            )
        rel = rel[len(WORKSPACE) :]
    parts = [part for part in rel.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise PathOutsideWorkspaceError(f"'{path}' contains '..'; paths must stay inside /workspace")
    return "/".join(parts) or "."


def decode_content(content: str, encoding: str, cap: int) -> bytes:
    """The bytes a caller meant, checked against the write cap."""
    if encoding == "base64":
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise EncodingError("content is not valid base64; send standard base64 or use encoding='utf-8'") from exc
    else:
        data = content.encode("utf-8", errors="surrogatepass")
    if len(data) > cap:
        raise SizeLimitError(f"content is {len(data)} bytes, over the {cap}-byte write cap; split it into parts")
    return data


def fit_listing(listing: FileListing, budget_chars: int) -> FileListing:
    """`listing` with as many entries as fit `budget_chars`; truncated when some were left out."""
    used = 200
    for kept, entry in enumerate(listing.entries):
        used += len(entry.model_dump_json()) + 1
        if used > budget_chars:
            return listing.model_copy(update={"entries": listing.entries[:kept], "truncated": True})
    return listing


class FileOps:
    """Reads, writes and lists files in a sandbox through its supervisor."""

    def __init__(self, supervisors: Supervisors) -> None:
        self._supervisors = supervisors

    async def write(self, container_id: str, path: str, data: bytes, user: str | None = None) -> FileWritten:
        rel = workspace_path(path)
        if rel == ".":
            raise InvalidRequestError("give a file path under /workspace, not /workspace itself")
        reply = await self._ask(container_id, {"t": protocol.WRITE, "path": rel, "mode": "644"}, path, data, user)
        return FileWritten(path=reply.obj["path"], size=reply.obj["size"])

    async def read(
        self, container_id: str, path: str, max_bytes: int, encoding: str | None, user: str | None = None
    ) -> FileContent:
        reply = await self._ask(
            container_id, {"t": protocol.READ, "path": workspace_path(path), "max_bytes": max_bytes}, path, user=user
        )
        data = reply.body
        if encoding is None:
            try:
                text, chosen = data.decode("utf-8"), "utf-8"
            except UnicodeDecodeError:
                text, chosen = base64.b64encode(data).decode(), "base64"
        elif encoding == "utf-8":
            try:
                text, chosen = data.decode("utf-8"), "utf-8"
            except UnicodeDecodeError as exc:
                raise EncodingError(f"'{path}' is not valid UTF-8; read it with encoding='base64'") from exc
        else:
            text, chosen = base64.b64encode(data).decode(), "base64"
        return FileContent(
            path=reply.obj["path"],
            encoding=chosen,
            content=text,
            size=reply.obj["size"],
            truncated=reply.obj["truncated"],
        )

    async def read_page(
        self,
        container_id: str,
        path: str,
        offset: int,
        length: int,
        encoding: str | None,
        budget_chars: int,
        user: str | None = None,
    ) -> tuple[FileReadResult, bytes]:
        """A page of a file: text within `budget_chars` (as JSON counts it), or binary bytes
        whose base64 fits the budget; returns the page and its bytes."""
        reach = offset + length
        if reach > protocol.MAX_BODY:
            raise InvalidRequestError(
                f"offset + length is {reach} bytes; sandbox_read_file reaches the first {protocol.MAX_BODY} bytes "
                "of a file: cut the rest out with sandbox_exec (tail -c, split) and read that"
            )
        request = {"t": protocol.READ, "path": workspace_path(path), "max_bytes": reach}
        reply = await self._ask(container_id, request, path, user=user)
        size = int(reply.obj["size"])
        data = reply.body[offset:]
        text = _text_of(data) if encoding != "base64" else None
        if text is None and encoding == "utf-8":
            raise EncodingError(f"'{path}' is not UTF-8 text; leave encoding out to read it as binary")
        if text is None:
            data = data[: max((budget_chars - 1000) * 3 // 4, 1)]
        else:
            while json_chars(text) > budget_chars:
                text = text[: len(text) * budget_chars // json_chars(text) - 1]
            data = text.encode("utf-8")
        end = offset + len(data)
        page = FileReadResult(
            path=reply.obj["path"],
            encoding="binary" if text is None else "utf-8",
            content=text or "",
            size=size,
            offset=offset,
            length=len(data),
            has_more=end < size,
            next_offset=end if end < size else None,
        )
        return page, data

    async def list(
        self, container_id: str, path: str, recursive: bool, max_entries: int, user: str | None = None
    ) -> FileListing:
        request = {"t": protocol.LIST, "path": workspace_path(path), "recursive": recursive, "max_entries": max_entries}
        reply = await self._ask(container_id, request, path, user=user)
        entries = [FileEntry(**entry) for entry in reply.obj["entries"]]
        return FileListing(path=reply.obj["path"], entries=entries, truncated=reply.obj["truncated"])

    async def _ask(
        self, container_id: str, request: dict[str, Any], path: str, body: bytes = b"", user: str | None = None
    ) -> Frame:
        if user is not None:
            request = {**request, "user": user}
        reply = await self._supervisors.call(container_id, request, body, timeout_s=_DEADLINE_S)
        if reply.obj.get("ok"):
            return reply
        message = reply.obj.get("message", "failed")
        match reply.obj.get("error"):
            case "outside":
                raise PathOutsideWorkspaceError(message)
            case "missing":
                raise NotFoundError(f"{message}; call sandbox_list_files to see what is there")
            case _:
                raise InvalidRequestError(message)


def _text_of(data: bytes) -> str | None:
    """`data` as text, if it is UTF-8 without NUL bytes (a character cut at the end is left out
    for the next page); else None."""
    for cut in range(4):
        try:
            text = data[: len(data) - cut].decode("utf-8")
        except UnicodeDecodeError as exc:
            if exc.start < len(data) - 4:
                return None
            continue
        return None if "\x00" in text else text
    return None
