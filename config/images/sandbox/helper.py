#!/usr/bin/python3
"""dockyard's helper inside a sandbox: the wipe and check that let a pool hand a released
sandbox to its next owner, and a stdin/stdout relay to a local TCP port. (The file tools'
operations live in confined.py, the kill of a command's processes in reaper.py.)

The supervisor runs `reset` and `verify` as this command, as the sandbox user. Run as `dockyard-helper <verb> <args...>`, a verb answers one JSON
object on stdout: {"ok": true, ...} or {"ok": false, "error": "io", "message": <text>}.
`reset` kills every process of the sandbox user and empties the writable places; `verify`
answers {"ok": true, "leftovers": [...]}, empty when clean. `release`, run as a member's own
user before `reset`, kills that user's processes and removes what it owns (or may remove) in the
writable places, opening its directories to the rest, and makes its home fresh again.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

VERSION = 1
ROOT = "/workspace"
HOME = os.environ.get("HOME", "/home/agent")
SKEL = "/etc/skel"
SCRATCH = ("/workspace", "/tmp", "/dev/shm", "/dev/mqueue")


def answer(**fields: Any) -> None:
    sys.stdout.write(json.dumps({"ok": True, **fields}))


def processes() -> dict[int, tuple[int, int, str, int, str]]:
    """{pid: (ppid, start time, state, uid, command)} of every process this helper can see."""
    found: dict[int, tuple[int, int, str, int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                command = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            uid = os.stat(f"/proc/{entry}").st_uid
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        found[int(entry)] = (int(fields[1]), int(fields[19]), fields[0], uid, command[:120])
    return found


def strays(
    found: dict[int, tuple[int, int, str, int, str]],
) -> tuple[int | None, dict[int, tuple[int, int, str, int, str]]]:
    """Live processes that are neither PID 1, nor the container's command, nor this helper."""
    children_of_init = [(info[1], pid) for pid, info in found.items() if info[0] == 1]
    keeper = min(children_of_init)[1] if children_of_init else None
    spare = {1, os.getpid(), keeper}
    return keeper, {pid: info for pid, info in found.items() if pid not in spare and info[2] != "Z"}


def empty(path: str) -> None:
    """Remove everything inside `path`, also what its owner made read-only."""

    def writable_again(func: Callable[[str], object], target: str, _exc: object) -> None:
        os.chmod(os.path.dirname(target), 0o700)
        if os.path.isdir(target) and not os.path.islink(target):
            os.chmod(target, 0o700)
            shutil.rmtree(target, onerror=writable_again)
        else:
            func(target)

    for name in os.listdir(path):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            os.chmod(full, 0o700)
            shutil.rmtree(full, onerror=writable_again)
        else:
            os.unlink(full)


def kill_mine() -> None:
    """Kill every stray process of this user (frozen first, so none can fork)."""
    me = os.getuid()
    for _ in range(50):
        _, found = strays(processes())
        mine = [pid for pid, info in found.items() if info[3] == me]
        if not mine:
            break
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in mine:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        time.sleep(0.01)
    ipcrm = shutil.which("ipcrm")
    if ipcrm:
        os.spawnv(os.P_WAIT, ipcrm, ["ipcrm", "--all"])


# What a fresh runtime's own places look like: the modes the image gives them (its Dockerfile).
FRESH_MODES = {ROOT: 0o2775, HOME: 0o700}


def place_print(path: str) -> dict[str, Any]:
    """What an owner may change on a place itself (not its content): mode, owner, group and
    extended attributes, ACLs included (their values hashed; '?' where unreadable)."""
    st = os.lstat(path)
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        names = []
    xattrs: dict[str, str] = {}
    for name in sorted(names):
        try:
            xattrs[name] = hashlib.sha256(os.getxattr(path, name, follow_symlinks=False)).hexdigest()[:16]
        except OSError:
            xattrs[name] = "?"
    return {"mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid, "gid": st.st_gid, "xattrs": xattrs}


def make_fresh(path: str, mode: int) -> None:
    """Undo what its owner may have changed on a place itself: every extended attribute (a
    default or access ACL too) goes, the mode is the image's again."""
    if not os.path.isdir(path) or os.stat(path).st_uid != os.getuid():
        return
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        names = []
    for name in names:
        try:
            os.removexattr(path, name, follow_symlinks=False)
        except OSError:
            pass
    os.chmod(path, mode)


def cmd_reset() -> None:
    """Kill every stray process (frozen first, so none can fork), then empty the writable places
    and make the places themselves as the image made them."""
    kill_mine()
    for path in (*SCRATCH, HOME):
        if os.path.isdir(path):
            empty(path)
    shutil.copytree(SKEL, HOME, symlinks=True, dirs_exist_ok=True)
    for path, mode in FRESH_MODES.items():
        make_fresh(path, mode)
    answer()


def open_and_remove(root: str) -> None:
    """Open every directory this user owns under `root` to all (mode 0777, sticky bit gone), so
    whoever comes next can empty it; then remove every entry it may remove, deepest first."""
    me = os.getuid()
    for folder, dirs, _files in os.walk(root):
        for name in dirs:
            try:
                fd = os.open(os.path.join(folder, name), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            except OSError:
                continue
            try:
                if os.fstat(fd).st_uid == me:
                    os.fchmod(fd, 0o777)
            except OSError:
                pass
            finally:
                os.close(fd)
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
        for name in dirs:
            path = os.path.join(folder, name)
            try:
                if os.path.islink(path):
                    os.unlink(path)
                else:
                    os.rmdir(path)
            except OSError:
                pass


def cmd_release() -> None:
    """A member's user leaving a shared sandbox: its processes, its files, a fresh home."""
    kill_mine()
    for path in SCRATCH:
        if os.path.isdir(path):
            open_and_remove(path)
    if os.path.isdir(HOME) and os.stat(HOME).st_uid == os.getuid():
        empty(HOME)
        shutil.copytree(SKEL, HOME, symlinks=True, dirs_exist_ok=True)
        make_fresh(HOME, FRESH_MODES[HOME])
    answer()


def same_tree(left: str, right: str) -> list[str]:
    """Paths under `left` that differ from, or are missing in, `right` (and the other way)."""
    differ = []
    for base, other in ((left, right), (right, left)):
        for folder, dirs, files in os.walk(base):
            for name in dirs + files:
                path = os.path.join(folder, name)
                twin = os.path.join(other, os.path.relpath(path, base))
                if not os.path.lexists(twin):
                    differ.append(os.path.relpath(path, base))
                elif base == left and os.path.isfile(path) and not os.path.islink(path):
                    with open(path, "rb") as a, open(twin, "rb") as b:
                        if a.read() != b.read():
                            differ.append(os.path.relpath(path, base))
    return sorted(set(differ))


def cmd_verify() -> None:
    """Report anything a previous owner could have left behind; nothing means clean."""
    leftovers = []
    keeper, found = strays(processes())
    if keeper is None:
        leftovers.append("the container's own command is not running")
    leftovers += [f"process {pid}: {info[4] or '?'}" for pid, info in sorted(found.items())]
    for path in SCRATCH:
        if os.path.isdir(path) and os.listdir(path):
            leftovers.append(f"{path} is not empty: {', '.join(sorted(os.listdir(path))[:5])}")
    leftovers += [f"{HOME}/{path} differs from a fresh home" for path in same_tree(HOME, SKEL)[:10]]
    for kind in ("shm", "msg", "sem"):
        try:
            with open(f"/proc/sysvipc/{kind}") as fh:
                if len(fh.read().strip().splitlines()) > 1:
                    leftovers.append(f"System V {kind} objects remain")
        except OSError:
            pass
    answer(leftovers=leftovers)


def cmd_connect(port: str) -> None:
    """Relay stdin/stdout to 127.0.0.1:<port>, for previews of sandboxes without a network."""
    conn = socket.create_connection(("127.0.0.1", int(port)), timeout=10)
    conn.settimeout(None)

    def upstream() -> None:
        while True:
            data = os.read(0, 65536)
            if not data:
                conn.shutdown(socket.SHUT_WR)
                return
            conn.sendall(data)

    threading.Thread(target=upstream, daemon=True).start()
    while True:
        data = conn.recv(65536)
        if not data:
            return
        os.write(1, data)


VERBS: dict[str, Callable[..., None]] = {
    "connect": cmd_connect,
    "reset": cmd_reset,
    "release": cmd_release,
    "verify": cmd_verify,
}


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in VERBS:
        if len(argv) > 1 and argv[1] == "version":
            print(VERSION)
            return 0
        sys.stderr.write(f"usage: dockyard-helper {{{'|'.join(VERBS)}}} ...\n")
        return 64
    try:
        VERBS[argv[1]](*argv[2:])
    except OSError as exc:
        sys.stdout.write(json.dumps({"ok": False, "error": "io", "message": f"{exc.strerror}: {exc.filename or ''}"}))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
