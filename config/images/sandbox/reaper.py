"""dockyard's per-command reaper inside a sandbox, and the limits its commands run under.

The supervisor starts every command through `Spawn`, which runs in the child the supervisor
forks (as root, before it execs anything). That child marks itself a child subreaper, forks
the command and stays behind as its reaper: every process the command starts, however it
detaches (a double fork, `setsid`, `nohup ... &`, an emptied environment), is re-parented to
the reaper when its parent ends, so it stays below the reaper for as long as the reaper lives.
The reaper runs as root, so the command's user can neither signal it nor trace it.

The reaper ends as soon as the command's own process does, with the same exit status (128 +
the signal for one killed by a signal): what the command left running in the background goes
on running (under init), as a server started with `nohup` should. On timeout, cancel or a
lost connection the supervisor calls `kill_tree`: the reaper is held stopped, so it cannot end
and hand its orphans on, while everything below it is frozen and killed, round after round,
until nothing is left.

Before it becomes the sandbox user, the command's process raises its OOM score to the
maximum (the kernel kills it, or anything it starts, long before the supervisor, which keeps
the lowest score the container allows) and lowers its CPU priority (within the sandbox's CPU
quota the supervisor comes first, so a busy swarm cannot starve it; alone, a command still
gets the whole quota).
"""

import asyncio
import ctypes
import os
import signal
import time

PR_SET_CHILD_SUBREAPER = 36
COMMAND_OOM_SCORE = 1000  # the kernel's first choice when the sandbox runs out of memory
SUPERVISOR_OOM_SCORE = -1000  # never chosen, where the container lets the supervisor ask for it
COMMAND_NICE = 10
KILL_LIMIT_S = 10  # a kill gives up after this long (a process stuck in the kernel, say)
_KILL_PAUSE_S = 0.002  # between rounds, for the killed to become zombies

_libc = ctypes.CDLL(None, use_errno=True)


class Spawn:
    """The `preexec_fn` that turns the supervisor's forked child into a command's reaper.

    Args:
        status_fd: a pipe the supervisor reads when the start fails: the errno of a fork or an
            identity change that failed here, as decimal digits (an exec that fails is
            reported by the subprocess machinery itself).
    """

    def __init__(self, uid, gid, status_fd):
        self.uid = uid
        self.gid = gid
        self.status_fd = status_fd

    def __call__(self):
        try:
            if _libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, os.strerror(errno))
            pid = os.fork()
            if pid == 0:
                self._become_command()
                return  # the subprocess machinery execs the command in this process
        except OSError as exc:
            _report(self.status_fd, exc.errno)
            raise
        _reap(pid)

    def _become_command(self):
        """In the command's process: a session of its own, the limits, then the user."""
        os.setsid()
        _write_score(COMMAND_OOM_SCORE)
        os.nice(COMMAND_NICE)
        os.setgroups([])
        os.setresgid(self.gid, self.gid, self.gid)
        os.setresuid(self.uid, self.uid, self.uid)
        os.close(self.status_fd)


def _report(fd, errno):
    try:
        os.write(fd, str(errno or 0).encode())
    except OSError:
        pass


def _reap(main):
    """The reaper's whole life: collect every orphan until the command's own process ends,
    then end with its status. Never returns."""
    code = 255
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        for fd in [int(name) for name in os.listdir("/proc/self/fd")]:  # the command's pipes, the supervisor's sockets
            try:
                os.close(fd)
            except OSError:
                pass  # the listing's own descriptor, closed already
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid == main:
                code = os.waitstatus_to_exitcode(status)
                code = 128 - code if code < 0 else code
                break
    finally:
        os._exit(code)


def _write_score(score):
    try:
        with open("/proc/self/oom_score_adj", "w") as fh:
            fh.write(str(score))
    except OSError:
        pass  # lower than the container allows: keep what it gives


def protect_supervisor():
    """Give the supervisor the lowest OOM score the container allows; returns the score
    (None where the kernel has no such knob)."""
    _write_score(SUPERVISOR_OOM_SCORE)
    try:
        with open("/proc/self/oom_score_adj") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return None


def processes():
    """{pid: (ppid, state, uid)} of every process in the sandbox."""
    found = {}
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


def descendants(table, roots):
    """The live (not yet zombie) processes below any of `roots` in `table`."""
    children = {}
    for pid, (ppid, _state, _uid) in table.items():
        children.setdefault(ppid, []).append(pid)
    found = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return {pid for pid in found if table[pid][1] not in "ZX"}


async def kill_tree(root):
    """Freeze, then kill, every process below the reaper `root`, round after round until
    none is left; returns how many were killed. The reaper is held stopped meanwhile."""
    _signal(root, signal.SIGSTOP)
    killed = set()
    try:
        deadline = time.monotonic() + KILL_LIMIT_S
        while time.monotonic() < deadline:
            frozen = set()
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


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def oom_kills():
    """How many processes the kernel has killed in this sandbox for memory (None if unknown)."""
    for path, key in (("/sys/fs/cgroup/memory/memory.oom_control", "oom_kill"), ("/sys/fs/cgroup/memory.events", "oom_kill")):
        try:
            with open(path) as fh:
                for line in fh:
                    name, _, value = line.partition(" ")
                    if name == key:
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def memory_limit_mb():
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
