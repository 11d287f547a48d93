"""The official MCP SDK as installed here, packed for a sandbox (which has no network to pip
from): the `mcp` distribution and everything it requires, as a tar owned by the sandbox user."""

from __future__ import annotations

import io
import tarfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SANDBOX_UID = 1000


def _closure(root: str) -> list[str]:
    """Distribution names `root` needs here, following extras it asks for (e.g. pyjwt[crypto])."""
    wanted: dict[str, set[str]] = {}
    todo: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    while todo:
        name, extras = todo.pop()
        key = canonicalize_name(name)
        if key in wanted and extras <= wanted[key]:
            continue
        wanted.setdefault(key, set()).update(extras)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            envs = [{"extra": extra} for extra in (extras or {""})]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((req.name, frozenset(req.extras)))
    return sorted(wanted)


def mcp_client_tar(prefix: str) -> bytes:
    """A tar of the SDK's importable files under `prefix` (as if it were site-packages)."""
    out = io.BytesIO()
    folders: set[str] = set()

    def owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = SANDBOX_UID
        info.uname = info.gname = "agent"
        return info

    with tarfile.open(fileobj=out, mode="w") as tar:
        for name in _closure("mcp"):
            try:
                dist = distribution(name)
            except PackageNotFoundError:
                continue
            for file in dist.files or []:
                if file.parts[0] == ".." or "__pycache__" in file.parts:
                    continue
                path = Path(str(file.locate()))
                if not path.is_file():
                    continue
                arcname = f"{prefix}/{file}"
                parents = Path(arcname).parents
                for folder in reversed([str(parent) for parent in parents if str(parent) != "."]):
                    if folder not in folders:  # the sandbox user must own them, to wipe them later
                        folders.add(folder)
                        entry = owned(tarfile.TarInfo(folder))
                        entry.type, entry.mode = tarfile.DIRTYPE, 0o755
                        tar.addfile(entry)
                info = owned(tar.gettarinfo(str(path), arcname=arcname))
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
    return out.getvalue()
