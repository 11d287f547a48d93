"""File operations confined to a sandbox's /workspace.

Paths are checked twice: here, before anything runs (no `..`, no absolute path elsewhere),
and inside the sandbox by the helper, which resolves symlinks and refuses any path whose
real location is outside /workspace.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import anyio

from dockyard.runtime.docker import STDOUT, DockerBackend
from dockyard.runtime.errors import (
    BackendError,
    EncodingError,
    InvalidRequestError,
    NotFoundError,
    PathOutsideWorkspaceError,
    SizeLimitError,
)
from dockyard.runtime.models import FileContent, FileEntry, FileListing, FileWritten

__all__ = ["WORKSPACE", "FileOps", "decode_content", "workspace_path"]

WORKSPACE = "/workspace"
_USER = "agent"
_HELPER_DEADLINE_S = 60


def workspace_path(path: str) -> str:
    """The caller's path as a clean path relative to /workspace ('.' for the root), or raise."""
    if "\x00" in path:
        raise PathOutsideWorkspaceError("paths may not contain NUL bytes")
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


class FileOps:
    """Reads, writes and lists files in a sandbox through its helper."""

    def __init__(self, docker: DockerBackend) -> None:
        self._docker = docker

    async def write(self, container_id: str, path: str, data: bytes) -> FileWritten:
        rel = workspace_path(path)
        if rel == ".":
            raise InvalidRequestError("give a file path under /workspace, not /workspace itself")
        reply = await self._helper(container_id, ["write", rel, "644"], path, stdin=data)
        return FileWritten(path=reply["path"], size=reply["size"])

    async def read(self, container_id: str, path: str, max_bytes: int, encoding: str | None) -> FileContent:
        reply = await self._helper(container_id, ["read", workspace_path(path), str(max_bytes)], path)
        data = base64.b64decode(reply["content_b64"])
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
            path=reply["path"], encoding=chosen, content=text, size=reply["size"], truncated=reply["truncated"]
        )

    async def list(self, container_id: str, path: str, recursive: bool, max_entries: int) -> FileListing:
        args = ["list", workspace_path(path), "1" if recursive else "0", str(max_entries)]
        reply = await self._helper(container_id, args, path)
        entries = [FileEntry(**entry) for entry in reply["entries"]]
        return FileListing(path=reply["path"], entries=entries, truncated=reply["truncated"])

    async def _helper(self, container_id: str, args: list[str], path: str, stdin: bytes = b"") -> dict[str, Any]:
        out = bytearray()
        with anyio.move_on_after(_HELPER_DEADLINE_S) as deadline:
            async with self._docker.exec_attached(container_id, ["dockyard-helper", *args], user=_USER) as channel:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(channel.feed, stdin)
                    async for kind, chunk in channel.frames():
                        if kind == STDOUT:
                            out += chunk
        if deadline.cancelled_caught:
            raise BackendError(f"the sandbox did not finish handling '{path}' within {_HELPER_DEADLINE_S} s")
        try:
            reply = json.loads(out)
        except ValueError as exc:
            raise InvalidRequestError(f"the sandbox could not handle '{path}'") from exc
        if reply.get("ok"):
            return reply
        message = reply.get("message", "failed")
        match reply.get("error"):
            case "outside":
                raise PathOutsideWorkspaceError(message)
            case "missing":
                raise NotFoundError(f"{message}; call sandbox_list_files to see what is there")
            case _:
                raise InvalidRequestError(message)
