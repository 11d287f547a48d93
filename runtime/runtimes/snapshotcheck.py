"""A snapshot's tar, checked entry by entry before anything of it reaches a sandbox.

A snapshot lives in the data dir as two tars (`/workspace` and the home). Whoever could
alter them there must still not be able to write outside those two places when the tar is
extracted, so every entry is checked and copied into a fresh tar that is the only one sent:

- names are relative, without `..`, and never below a symlink the archive made earlier
  (a symlink to the control directory followed by a file "inside" it would land on the host);
- hard links point at a regular file the archive itself holds;
- only files, directories and symlinks: device nodes, FIFOs and the like are refused
  (the sandbox user cannot make devices, so a snapshot that holds one was altered);
- owners are the sandbox's users (anything else, root included, becomes the sandbox user),
  the group is the sandbox's; setuid bits are dropped, and setgid and sticky on files (a
  folder keeps setgid: that is how `/workspace` shares files between a team's users);
- the archive's root entry is skipped: `/workspace` and the home keep a fresh runtime's owner
  and mode.
"""

from __future__ import annotations

import tarfile
from pathlib import PurePosixPath
from typing import BinaryIO

from dockyard.runtime.substrate.errors import UnsafeSnapshotError

__all__ = ["copy_checked"]

_KINDS = {tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE}


def copy_checked(snapshot_id: str, source: BinaryIO, sink: BinaryIO, uids: range, gid: int) -> int:
    """Copy the tar in `source` into `sink`, entry by entry, refusing anything unsafe (see the
    module docstring); returns the number of entries copied."""
    links: set[str] = set()  # symlinks made so far: nothing may be written below them
    files: set[str] = set()  # regular files made so far: the only targets a hard link may have
    count = 0
    try:
        with (
            tarfile.open(fileobj=source, mode="r|") as tar,
            tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as out,
        ):
            for entry in tar:
                name = _checked_name(snapshot_id, entry.name)
                if name is None:
                    continue
                if entry.type not in _KINDS:
                    raise UnsafeSnapshotError(
                        snapshot_id, f"'{_shown(name)}' is a special file (device, FIFO or the like)"
                    )
                parents = PurePosixPath(name).parents
                below = next((str(p) for p in parents if str(p) in links), None)
                if below is not None:
                    raise UnsafeSnapshotError(snapshot_id, f"'{_shown(name)}' lies below the symlink '{_shown(below)}'")
                if entry.type == tarfile.LNKTYPE:
                    target = _checked_name(snapshot_id, entry.linkname)
                    if target is None or target not in files:
                        raise UnsafeSnapshotError(
                            snapshot_id,
                            f"the hard link '{_shown(name)}' points at '{_shown(entry.linkname)}', not a file it holds",
                        )
                    entry.linkname = target
                entry.name = name
                entry.mode &= 0o3777 if entry.isdir() else 0o777  # setgid stays on folders: /workspace shares by group
                if entry.uid not in uids:
                    entry.uid = uids.start
                entry.gid = gid
                entry.uname = entry.gname = ""
                (links.add if entry.type == tarfile.SYMTYPE else links.discard)(
                    name
                )  # an entry replaces what was there
                (files.add if entry.isfile() else files.discard)(name)
                out.addfile(entry, tar.extractfile(entry) if entry.isfile() else None)
                count += 1
    except tarfile.TarError as exc:
        raise UnsafeSnapshotError(snapshot_id, f"its archive is damaged ({exc})") from None
    return count


def _checked_name(snapshot_id: str, raw: str) -> str | None:
    """The entry's name made relative and plain; None for the archive's root itself."""
    if raw.startswith("/"):
        raise UnsafeSnapshotError(snapshot_id, f"the entry '{_shown(raw)}' has an absolute name")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeSnapshotError(snapshot_id, f"the entry '{_shown(raw)}' climbs out with '..'")
    return "/".join(parts) or None


def _shown(name: str) -> str:
    """A name cut short and stripped of control characters, safe to put in a message."""
    plain = "".join(ch if ch.isprintable() else "?" for ch in name)
    return plain if len(plain) <= 120 else plain[:117] + "..."
