"""File operations confined to /workspace, safe against a sandbox that changes its files meanwhile.

The supervisor runs these with the rights of the sandbox user (or of a member's own user).

A path is walked one name at a time from a descriptor of /workspace: each name is opened with
O_PATH | O_NOFOLLOW relative to the directory before it, held open, so the kernel never follows
a symlink and never meets a `..`. A symlink found on the way is read and its target walked by
the same rules, as a path inside /workspace: an absolute target must lie under /workspace, a
relative one may not climb above it; a target elsewhere is refused. The file itself is opened
relative to its directory with O_NOFOLLOW (O_NONBLOCK, so a FIFO cannot hang a read) and must
be the very file the walk found. A process that swaps a directory for a symlink while a tool
runs can change what is found, never lead it out of /workspace: /workspace is a mount of its
own, so nothing inside can be moved out of it, and everything opened is a name inside a
directory already held open.

Names the file tools take are UTF-8 without control characters (newlines, tabs, escapes).
A listing shows any other name with \\xNN for each byte that is not printable UTF-8 (\\uNNNN
for other control characters) and marks its entry `is_addressable: false`: such a file can be
renamed with a command, not read or written by name. Only regular files are read or written
and only directories listed; FIFOs, sockets and devices are listed but refused.
"""

import errno
import os
import secrets
import stat
import unicodedata
from typing import Any

ROOT = "/workspace"
MAX_LINKS = 40  # as the kernel's own limit on symlinks in one lookup

_STEP = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "device",
    stat.S_IFBLK: "device",
}
_SPECIAL = {"fifo": "a FIFO (named pipe)", "socket": "a socket", "device": "a device"}


class Refused(Exception):
    """A file operation refused; `code` tells the server which error it is."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def shown(name: str) -> tuple[str, bool]:
    """A name (str, undecodable bytes as surrogates) as printable text, and whether it is one
    the file tools can address: each byte that is not UTF-8 becomes \\xNN, each control
    character \\xNN (or \\uNNNN)."""
    out = []
    for char in name:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF or unicodedata.category(char) == "Cc":
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    text = "".join(out)
    return text, text == name


def kind_of(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "other")


def _name_ok(name: str, path: str) -> None:
    text, ok = shown(name)
    if not ok:
        raise Refused(
            "odd_name",
            f"'{shown(path)[0]}' leads to the name '{text}', which is not printable UTF-8; the file tools "
            "take UTF-8 names without control characters (rename it with a command)",
        )


def _parts(path: str) -> list[str]:
    """The caller's path as names under /workspace (the server has cleaned it; checked again)."""
    _name_ok(path, path)
    rel = path[len(ROOT) :] if path == ROOT or path.startswith(ROOT + "/") else path
    if rel.startswith("/"):
        raise Refused("outside", f"'{path}' is outside /workspace; use a path relative to /workspace")
    parts = [part for part in rel.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise Refused("outside", f"'{path}' contains '..'; paths must stay inside /workspace")
    return parts


def _link_parts(target: str, path: str) -> tuple[bool, list[str]]:
    """A symlink's target as names to walk: absolute ones restart at /workspace."""
    if target.startswith("/"):
        if target != ROOT and not target.startswith(ROOT + "/"):
            raise Refused("outside", f"'{path}' leads through a symlink to {shown(target)[0]}, outside /workspace")
        return True, [part for part in target[len(ROOT) :].split("/") if part not in ("", ".")]
    return False, [part for part in target.split("/") if part not in ("", ".")]


class _Walk:
    """The directories held open on the way to a path's last name."""

    def __init__(self, path: str, make_dirs: bool = False) -> None:
        self.path = path
        self.fds = [os.open(ROOT, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)]
        self.names: list[str] = []
        # The last name, in self.dir; None when the path ends at a directory held (/workspace, or a link to '.').
        self.leaf: str | None = None
        self.info: os.stat_result | None = None  # its lstat, None when it does not exist
        try:
            self._walk(_parts(path), make_dirs)
        except BaseException:
            self.close()
            raise

    @property
    def dir(self) -> int:
        return self.fds[-1]

    @property
    def relative(self) -> str:
        return "/".join(self.names + ([self.leaf] if self.leaf is not None else [])) or "."

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def __enter__(self) -> "_Walk":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _up(self) -> None:
        if not self.names:
            raise Refused("outside", f"'{self.path}' leads through a symlink to a place outside /workspace")
        os.close(self.fds.pop())
        self.names.pop()

    def _walk(self, todo: list[str], make_dirs: bool) -> None:
        links = 0
        while todo:
            name = todo.pop(0)
            if name == "..":  # only from a symlink's target
                self._up()
                continue
            _name_ok(name, self.path)
            try:
                fd = os.open(name, _STEP, dir_fd=self.dir)
            except FileNotFoundError:
                if not todo:
                    self.leaf, self.info = name, None
                    return
                if not make_dirs:
                    raise Refused("missing", f"'{self.path}' does not exist") from None
                try:
                    os.mkdir(name, 0o777, dir_fd=self.dir)
                except FileExistsError:
                    pass
                todo.insert(0, name)  # opened (and checked) like any other name
                continue
            info = os.fstat(fd)
            if stat.S_ISLNK(info.st_mode):
                os.close(fd)
                links += 1
                if links > MAX_LINKS:
                    raise Refused("loop", f"'{self.path}' goes through more than {MAX_LINKS} symlinks")
                try:
                    target = os.readlink(name, dir_fd=self.dir)
                except OSError:  # replaced meanwhile: look at the name again
                    todo.insert(0, name)
                    continue
                absolute, more = _link_parts(target, self.path)
                if absolute:
                    while self.names:
                        self._up()
                todo[:0] = more
            elif not todo:
                os.close(fd)
                self.leaf, self.info = name, info
            elif stat.S_ISDIR(info.st_mode):
                self.fds.append(fd)
                self.names.append(name)
            else:
                os.close(fd)
                where = "/".join([*self.names, name])
                raise Refused("not_dir", f"'{self.path}': '{where}' is {kind_of(info.st_mode)}, not a directory")

    def open(self, flags: int, want: str) -> tuple[int, os.stat_result]:
        """The last name opened with `flags`, checked to be the file the walk found."""
        leaf, found = self.leaf, self.info
        if leaf is None or found is None:  # the callers open only a name the walk found
            raise Refused("missing", f"'{self.path}' does not exist")
        try:
            fd = os.open(leaf, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY, dir_fd=self.dir)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise Refused("changed", f"'{self.path}' changed while it was being opened; try again") from exc
        except OSError as exc:
            if exc.errno != errno.ELOOP:  # a symlink put in its place meanwhile
                raise
            raise Refused("changed", f"'{self.path}' changed while it was being opened; try again") from exc
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (found.st_dev, found.st_ino) or kind_of(info.st_mode) != want:
            os.close(fd)
            raise Refused("changed", f"'{self.path}' changed while it was being opened; try again")
        return fd, info


def _refuse_kind(path: str, info: os.stat_result, want: str) -> None:
    kind = kind_of(info.st_mode)
    if kind == "dir":
        raise Refused("not_file", f"'{path}' is a directory; call sandbox_list_files to see what it holds")
    if kind != want:
        what = _SPECIAL.get(kind, "not a regular file")
        raise Refused(
            "not_file", f"'{path}' is {what}, not a regular file; the file tools read and write regular files only"
        )


def read_file(path: str, max_bytes: int) -> tuple[dict[str, Any], bytes]:
    """Up to `max_bytes` of a regular file: (answer, bytes)."""
    with _Walk(path) as walk:
        if walk.leaf is None:
            raise Refused("not_file", f"'{path}' is a directory; call sandbox_list_files to see what it holds")
        if walk.info is None:
            raise Refused("missing", f"'{path}' does not exist")
        _refuse_kind(path, walk.info, "file")
        fd, info = walk.open(os.O_RDONLY | os.O_NONBLOCK, "file")
        try:
            chunks, left = [], max(int(max_bytes), 0)
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 20))
                if not chunk:
                    break
                chunks.append(chunk)
                left -= len(chunk)
        finally:
            os.close(fd)
        data = b"".join(chunks)
        answer = {"ok": True, "path": walk.relative, "size": info.st_size, "truncated": info.st_size > len(data)}
        return answer, data


def write_file(path: str, mode: str, data: bytes) -> dict[str, Any]:
    """Write `data` to `path` atomically (a temp file renamed over it); returns the answer."""
    with _Walk(path, make_dirs=True) as walk:
        if walk.leaf is None:
            raise Refused("not_file", f"'{path}' is a directory; give the path of a file in it")
        if walk.info is not None:
            _refuse_kind(path, walk.info, "file")
        tmp = f".dockyard-write-{secrets.token_hex(8)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, int(mode, 8) & 0o777, dir_fd=walk.dir)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, walk.leaf, src_dir_fd=walk.dir, dst_dir_fd=walk.dir)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=walk.dir)
            except FileNotFoundError:
                pass
            raise
        return {"ok": True, "path": walk.relative, "size": len(data)}


def list_files(path: str, recursive: bool, max_entries: int) -> dict[str, Any]:
    """Entries under a directory, breadth first and sorted by name, at most `max_entries`."""
    limit = int(max_entries)
    with _Walk(path) as walk:
        if walk.leaf is None:  # the directory the walk holds (O_PATH): open it for reading
            top = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=walk.dir)
        elif walk.info is None:
            raise Refused("missing", f"'{path}' does not exist")
        elif not stat.S_ISDIR(walk.info.st_mode):
            raise Refused("not_dir", f"'{path}' is {kind_of(walk.info.st_mode)}, not a directory")
        else:
            top, _ = walk.open(os.O_RDONLY | os.O_DIRECTORY, "dir")
        where = walk.relative
    entries: list[dict[str, Any]] = []
    truncated = False
    queue = [(top, "" if where == "." else where + "/", True)]
    try:
        while queue and not truncated:
            fd, prefix, addressable = queue.pop(0)
            try:
                truncated = _list_one(fd, prefix, addressable, entries, limit, queue if recursive else None)
            finally:
                os.close(fd)
    finally:
        for fd, _, _ in queue:
            os.close(fd)
    return {"ok": True, "path": where, "entries": entries, "truncated": truncated}


def _list_one(
    fd: int,
    prefix: str,
    addressable: bool,
    entries: list[dict[str, Any]],
    limit: int,
    queue: list[tuple[int, str, bool]] | None,
) -> bool:
    """Add one directory's entries; queue its subdirectories (opened, never through a symlink).
    Returns True when the limit cut the listing short."""
    with os.scandir(fd) as found:
        items = sorted(found, key=lambda entry: os.fsencode(entry.name))
    for entry in items:
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed meanwhile
            continue
        if len(entries) >= limit:
            return True
        text, ok = shown(entry.name)
        kind = kind_of(info.st_mode)
        entries.append(
            {
                "path": prefix + text,
                "type": kind,
                "size": info.st_size,
                "mtime": info.st_mtime,
                "is_addressable": addressable and ok,
            }
        )
        if queue is not None and kind == "dir":
            try:
                sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:  # unreadable, or swapped for something else meanwhile: listed, not entered
                continue
            queue.append((sub, prefix + text + "/", addressable and ok))
    return False


def refusal(exc: Refused | OSError) -> dict[str, Any]:
    """The JSON answer for a refused or failed file operation."""
    if isinstance(exc, Refused):
        return {"ok": False, "error": exc.code, "message": str(exc)}
    name = exc.filename
    where = (
        f" ({shown(os.fsdecode(name) if isinstance(name, (str, bytes)) else str(name))[0]})" if name is not None else ""
    )
    return {"ok": False, "error": "io", "message": f"{exc.strerror or exc}{where}"}
