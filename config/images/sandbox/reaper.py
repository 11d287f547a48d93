"""The kill side of dockyard's per-command reaper inside a sandbox, and the limits its commands run under.

Every command is started below a reaper of its own (reaper.c, run as root): a child subreaper
that every process the command starts is re-parented to, however it detaches, for as long as
the reaper lives; it ends as soon as the command's own process does, with the same status.
On timeout, cancel or a lost connection the supervisor calls `kill_tree`: the reaper is held
stopped, so it cannot end and hand its orphans on, while everything below it is frozen and
killed, round after round, until nothing is left.

The command's process has the maximum OOM score (the kernel kills it, or anything it starts,
long before the supervisor, which keeps the lowest score the container allows) and a lower CPU
priority (within the sandbox's CPU quota the supervisor comes first, so a busy swarm cannot
starve it; alone, a command still gets the whole quota).
"""

import asyncio
import os
import signal
import time
from collections.abc import Iterable

SUPERVISOR_OOM_SCORE = -1000  # never chosen, where the container lets the supervisor ask for it
KILL_LIMIT_S = 10  # a kill gives up after this long (a process stuck in the kernel, say)
_KILL_PAUSE_S = 0.002  # between rounds, for the killed to become zombies


def _write_score(score: int) -> None:
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write(str(score))
    except OSError:
        pass  # lower than the container allows: keep what it gives


def protect_supervisor() -> int | None:
    """Give the supervisor the lowest OOM score the container allows; returns the score
    (None where the kernel has no such knob)."""
    _write_score(SUPERVISOR_OOM_SCORE)
    try:
        with open("/proc/self/oom_score_adj") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return None


def processes() -> dict[int, tuple[int, str, int]]:
    """{pid: (ppid, state, uid)} of every process in the sandbox."""
    found: dict[int, tuple[int, str, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            uid = os.stat(f"/proc/{entry}").st_uid
        except (OSError, IndexError):
            continue
        found[int(entry)] = (int(fields[1]), fields[0], uid)
    return found


def descendants(table: dict[int, tuple[int, str, int]], roots: Iterable[int]) -> set[int]:
    """The live (not yet zombie) processes below any of `roots` in `table`."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _state, _uid) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {pid for pid in found if table[pid][1] not in "ZX"}


async def kill_tree(root: int) -> int:
    """Freeze, then kill, every process below the reaper `root`, round after round until
    none is left; returns how many were killed. The reaper is held stopped meanwhile."""
    _signal(root, signal.SIGSTOP)
    killed: set[int] = set()
    try:
        deadline = time.monotonic() + KILL_LIMIT_S
        while time.monotonic() < deadline:
            frozen: set[int] = set()
            while True:  # freeze until a look finds nothing new: then nothing can fork
                alive = descendants(processes(), [root])
                fresh = alive - frozen
                if not fresh:
                    break
                for pid in fresh:
                    _signal(pid, signal.SIGSTOP)
                frozen |= fresh
            if not alive:
                break
            for pid in alive:
                _signal(pid, signal.SIGKILL)
            killed |= alive
            await asyncio.sleep(_KILL_PAUSE_S)
    finally:
        _signal(root, signal.SIGCONT)
    return len(killed)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def oom_kills() -> int | None:
    """How many processes the kernel has killed in this sandbox for memory (None if unknown)."""
    for path, key in (
        ("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill"),
        ("/sys/fs/cgroup/memory.events", "oom_kill"),
    ):
        try:
            with open(path) as fh:
                for line in fh:
                    name, _, value = line.partition(" ")
                    if name == key:
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def memory_limit_mb() -> int | None:
    """The sandbox's memory limit in MiB (None if unknown or unlimited)."""
    for path in ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"):
        try:
            with open(path) as fh:
                value = fh.read().strip()
        except OSError:
            continue
        if value.isdigit() and int(value) < 1 << 50:
            return int(value) >> 20
        return None
    return None
