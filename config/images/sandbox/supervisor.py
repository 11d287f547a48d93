#!/usr/bin/python3
"""dockyard's supervisor: the long-lived process inside every sandbox.

It is the container's command (under Docker's init), runs as root with only the capabilities
it needs to act as the sandbox's users (SETUID, SETGID) and to stop their processes (KILL),
and serves the dockyard server over a control channel, so that a command costs no
`docker exec`. Commands and file operations run as the sandbox user `agent`, who can neither
signal this process nor read its memory or environment, nor reach its control socket.

Members of a team that share one sandbox each run as a user of their own (`m1`..`m16`, primary
group `agent`): the server names the user with each request, and this process runs nothing as
any other (never as root). With distinct uids and no capabilities, one member cannot read
another's /proc/<pid>/environ (its DOCKYARD_TOKEN), trace it, signal it or enter its home;
/workspace belongs to the group and everything runs with umask 002, so they share files there.

Control channel, protocol version 1 (the other end is dockyard.runtime.runtimes.supervisor)
--------------------------------------------------------------------------------
Transport: a unix stream socket, `control.sock` in /run/dockyard-sup/control, a directory the
server bind-mounts from the host. /run/dockyard-sup is root's alone (mode 0700), so the
sandbox user cannot reach the socket; no network is involved.

Frames (a JSON object with a type "t", and a binary body), their limits, the kinds below and
the handshake's proofs are defined once, in protocol.py beside this file, which the server
imports too.

Handshake, mutual, with the key the server wrote to `key` beside the socket:
  supervisor -> {"t": "hello", "protocol": 1, "nonce": N1}
  server     -> {"t": "auth", "protocol": 1, "nonce": N2, "proof": hex HMAC-SHA256(key, "server:" + N1)}
  supervisor -> {"t": "ready", "proof": HMAC(key, "supervisor:" + N2), "pid": P}
                or {"t": "refused", "message": ...} and it closes.
The server may rewrite the key file at any time; each handshake reads it afresh.

Requests carry an "id" chosen by the server, unique on its connection:
  exec {argv, env, cwd, timeout_s, cap_bytes, token, stdin: bool, user?}
      -> out {id, fd: 1|2} + bytes, in order, at most cap_bytes per stream ...
      -> exit {id, code, timed_out, dropped: [stdout bytes, stderr bytes], error?, refused?}
      (error: the command could not start; refused: "cwd" when the user cannot enter it,
      "user" when `user` is not one of the sandbox's users)
      The command runs as `user` (default `agent`; HOME, USER and LOGNAME are its own) in a new
      session with `token` as DOCKYARD_EXEC_ID, below a reaper of its own (reaper.c).
      stdin {id} + bytes feeds it; an empty body closes its stdin. kill {id} ends it.
      On timeout, kill or a closed connection, the command and everything it started
      (everything below its reaper, however it detached) is frozen, then killed.
      oom_kills: how many processes of the sandbox the kernel killed for memory while it ran
      (absent when none), memory_mb: the sandbox's memory limit then (absent when unknown).
  read {path, max_bytes, user?} -> result + the file's bytes
      (read, write and list walk the path inside /workspace without following a symlink out;
      see confined.py for how, and for how a listing shows names that are not UTF-8)
  write {path, mode, user?} + bytes -> result
  list {path, recursive, max_entries, user?} -> result
  reset {} / verify {} -> result (the helper's answer, run as `agent`; reset first stops every
      process of the sandbox's users and has each member user that ran anything remove what
      it owns; verify also finds a member's home that differs from a fresh one)
  ping {} -> result
  result: {"t": "result", "id", "ok": true, ...} or {"ok": false, "error": code, "message"}.

Bridge: a process in the sandbox that connects to /run/dockyard/bridge.sock is relayed to the
server, which serves it MCP as the sandbox's owner (newline-delimited JSON-RPC):
  supervisor -> bridge_open {bid, uid, user}, bridge_data {bid} + bytes, bridge_close {bid}
      (uid: the connecting process's, from SO_PEERCRED; user: its name if it is one of the
      sandbox's users, else null)
  server     -> bridge_data {bid} + bytes, bridge_close {bid}
Bridge traffic uses the most recently authenticated connection.
"""

import asyncio
import contextlib
import errno
import json
import os
import pwd
import re
import secrets
import signal
import socket
import struct
import sys
import time
from collections.abc import Coroutine, Iterable, Iterator
from typing import Any

sys.path.insert(0, "/usr/local/lib/dockyard")
import confined
import helper
import protocol
import reaper
from protocol import BRIDGE_SOCKET, CHUNK, CONTROL_DIR, Closed

HELPER = "/usr/local/lib/dockyard/helper.py"
REAPER = "/usr/local/lib/dockyard/reaper"  # reaper.c, compiled when the image is built
USER = "agent"
EXIT_GRACE_S = 0.2  # how long output is still read after a command's own process ended
KILL_WAIT_S = 30  # a killed command's own process has surely ended by then

UMASK = 0o002  # files are the group's to share (a member's private ones it makes 0600 itself)
SKEL = "/etc/skel"

AGENT = pwd.getpwnam(USER)
# The members' users: a member of a shared sandbox runs as one of them, never as another's.
MEMBERS = {p.pw_name: p for p in pwd.getpwall() if re.fullmatch(r"m[0-9]+", p.pw_name) and p.pw_gid == AGENT.pw_gid}
USERS = {USER: AGENT, **MEMBERS}
UIDS = {p.pw_uid for p in USERS.values()}
# Member users that ran something since the last reset: each removes what it owns at the next.
USED: set[str] = set()


def user_of(request: dict[str, Any]) -> pwd.struct_passwd | None:
    """The sandbox user a request names (`agent` when it names none); None for any other."""
    name = request.get("user") or USER
    found = USERS.get(name) if isinstance(name, str) else None
    if found is not None and found.pw_name in MEMBERS:
        USED.add(found.pw_name)
    return found


@contextlib.contextmanager
def as_user(user: pwd.struct_passwd) -> Iterator[None]:
    """Act with a sandbox user's file rights for a moment (no await may happen inside)."""
    os.setegid(user.pw_gid)
    os.seteuid(user.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def user_env(user: pwd.struct_passwd) -> dict[str, str]:
    return {"HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name}


class Connection(protocol.Connection):
    """One framed connection to the server, and the commands it started."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.commands: dict[Any, Command] = {}


class Pipes(asyncio.SubprocessProtocol):
    """Hands a command's output and exit to it as they happen."""

    def __init__(self, command: "Command") -> None:
        self.command = command

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        self.command.output(fd, data)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self.command.pipe_closed(fd)

    def process_exited(self) -> None:
        self.command.exited.set()


class Command:
    """One running command: its process, its output and its kill.

    Its exit is noticed when its own process ends, not when its pipes close: a background
    child that inherited stdout must not hold the answer back (its output is still read for
    a moment, then the pipes are closed).
    """

    def __init__(self, conn: Connection, request: dict[str, Any]) -> None:
        self.conn = conn
        self.id = request["id"]
        self.request = request
        self.transport: asyncio.SubprocessTransport | None = None
        self.killed = False
        self.cap = int(request.get("cap_bytes") or (1 << 20))
        self.sent = [0, 0]
        self.dropped = [0, 0]
        self.token = request.get("token") or secrets.token_hex(12)
        self.user = user_of(request)
        self.outbox: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        self.exited = asyncio.Event()
        self.open_pipes = {1, 2}
        self.pipes_closed = asyncio.Event()
        self.early_stdin: list[bytes] = []
        self.kill_lock = asyncio.Lock()

    async def run(self) -> None:
        try:
            await self._run()
        except Closed:
            await self.kill()
        except Exception as exc:  # noqa: BLE001 - the server hears of it in the exit frame rather than wait
            await self.kill()
            with contextlib.suppress(Closed):
                await self.conn.send(
                    {
                        "t": "exit",
                        "id": self.id,
                        "code": 126,
                        "timed_out": False,
                        "dropped": self.dropped,
                        "error": f"supervisor failure: {exc!r}",
                    }
                )
        finally:
            self.conn.commands.pop(self.id, None)
            if self.transport is not None:
                RUNNING.discard(self.transport.get_pid())
                self.transport.close()

    async def _run(self) -> None:
        req = self.request
        if self.user is None:
            await self.conn.send(
                {
                    "t": "exit",
                    "id": self.id,
                    "code": 126,
                    "timed_out": False,
                    "dropped": [0, 0],
                    "refused": "user",
                    "error": f"no sandbox user {req.get('user')!r}",
                }
            )
            return
        env = {**BASE_ENV, **user_env(self.user), **{str(k): str(v) for k, v in req.get("env", {}).items()}}
        env["DOCKYARD_EXEC_ID"] = self.token
        # The working directory is opened with the command user's rights and entered through
        # its descriptor: the child changes directory while still root, and must not land
        # anywhere the user could not (a symlink swapped in meanwhile changes nothing).
        try:
            with as_user(self.user):
                cwd_fd = os.open(req.get("cwd") or "/workspace", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fchdir(cwd_fd)  # the user's search permission on the directory itself
                except OSError:
                    os.close(cwd_fd)
                    raise
                finally:
                    os.chdir("/")
        except OSError as exc:
            await self.conn.send(
                {
                    "t": "exit",
                    "id": self.id,
                    "code": 126,
                    "timed_out": False,
                    "dropped": [0, 0],
                    "refused": "cwd",
                    "error": f"cannot enter {req.get('cwd')}: {exc.strerror}",
                }
            )
            return
        loop = asyncio.get_running_loop()
        oom_before = reaper.oom_kills()
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        try:
            self.transport, _ = await loop.subprocess_exec(
                lambda: Pipes(self),
                REAPER,
                str(status_w),
                str(self.user.pw_uid),
                str(self.user.pw_gid),
                *req["argv"],
                stdin=asyncio.subprocess.PIPE if req.get("stdin") else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=f"/proc/self/fd/{cwd_fd}",
                umask=UMASK,
                pass_fds=(status_w,),
            )
        except OSError as exc:  # e.g. no pid to spare
            os.close(status_r)
            await self.not_started(exc)
            return
        finally:
            os.close(cwd_fd)
            os.close(status_w)
        if failed := await start_error(status_r):  # the reaper could not fork, become the user or exec
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.exited.wait(), KILL_WAIT_S)
            await self.not_started(failed)
            return
        RUNNING.add(self.transport.get_pid())  # its reaper
        if self.killed:  # cancelled while it started
            await self.kill()
        for body in self.early_stdin:
            self.write_stdin(body)
        sender = spawn(self.send_output())
        timed_out = False
        try:
            await asyncio.wait_for(self.exited.wait(), req.get("timeout_s"))
        except TimeoutError:
            timed_out = True
            await self.kill()
            await asyncio.wait_for(self.exited.wait(), KILL_WAIT_S)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.pipes_closed.wait(), EXIT_GRACE_S)
        if self.killed or timed_out:
            await self.kill()  # whatever it started meanwhile
        self.outbox.put_nowait(None)
        await sender
        code = self.transport.get_returncode()
        if code is None:  # `exited` is set once the process ended, and its status with it
            raise RuntimeError("the command's process ended without an exit status")
        ended = {
            "t": "exit",
            "id": self.id,
            "code": code if code >= 0 else 128 - code,
            "timed_out": timed_out,
            "dropped": self.dropped,
        }
        oom_after = reaper.oom_kills()
        if oom_before is not None and oom_after is not None and oom_after > oom_before:
            ended.update(oom_kills=oom_after - oom_before, memory_mb=reaper.memory_limit_mb())
        await self.conn.send(ended)

    async def not_started(self, exc: OSError) -> None:
        code = 127 if isinstance(exc, FileNotFoundError) else 126
        why = f"could not start the command: {exc.strerror}"
        if exc.errno == errno.EAGAIN:
            why += "; no process could be started: the sandbox is out of process slots"
            if stopped := stop_background():
                why += f", so the {stopped} background processes earlier commands left behind were stopped: try again"
        await self.conn.send(
            {"t": "exit", "id": self.id, "code": code, "timed_out": False, "dropped": [0, 0], "error": why}
        )

    def output(self, fd: int, data: bytes) -> None:
        index = 0 if fd == 1 else 1
        keep = data[: max(self.cap - self.sent[index], 0)]
        self.sent[index] += len(keep)
        self.dropped[index] += len(data) - len(keep)
        if keep:
            self.outbox.put_nowait((fd, keep))

    def pipe_closed(self, fd: int) -> None:
        self.open_pipes.discard(fd)
        if not self.open_pipes:
            self.pipes_closed.set()

    async def send_output(self) -> None:
        while (item := await self.outbox.get()) is not None:
            fd, data = item
            await self.conn.send({"t": "out", "id": self.id, "fd": fd}, data)

    async def feed(self, body: bytes) -> None:
        """Bytes for the command's stdin (an empty body closes it); kept until it starts."""
        if self.transport is None:
            self.early_stdin.append(body)
        else:
            self.write_stdin(body)

    def write_stdin(self, body: bytes) -> None:
        pipe = self.transport.get_pipe_transport(0) if self.transport is not None else None
        if not isinstance(pipe, asyncio.WriteTransport) or pipe.is_closing():  # none, or closed
            return
        if body:
            pipe.write(body)
        else:
            pipe.close()

    async def kill(self) -> None:
        """Freeze and kill every process below the command's reaper (never the supervisor's)."""
        self.killed = True
        if self.transport is None or self.transport.get_returncode() is not None:
            return  # not started, or ended: what it left in the background may stay
        async with self.kill_lock:
            await reaper.kill_tree(self.transport.get_pid())


TASKS: set[asyncio.Task[None]] = set()
# The reapers of the commands running now: everything of the sandbox users' not below one of
# them is background left by earlier commands (a server started with nohup, say), which may
# keep running.
RUNNING: set[int] = set()


def stop_background() -> int:
    """The sandbox is out of process slots: freeze, then kill, every process of the sandbox
    users that no running command owns (a fork bomb that backgrounded itself, say). Needs no
    new process, so it works when nothing else can start. Returns how many were stopped."""
    return stop_processes(RUNNING)


def stop_processes(spare: Iterable[int] = frozenset()) -> int:
    """Freeze, then kill, every process of the sandbox's users not below the reapers `spare`."""
    frozen: set[int] = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        table = reaper.processes()
        spared = reaper.descendants(table, spare)
        fresh = {
            pid
            for pid, (_ppid, state, uid) in table.items()
            if uid in UIDS and state not in "ZX" and pid not in spared and pid not in frozen
        }
        if not fresh:
            break
        for pid in fresh:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= fresh
    for pid in frozen:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return len(frozen)


async def start_error(status_r: int) -> OSError | None:
    """Why the reaper could not start a command (an OSError), from the errno it wrote in its
    status pipe; None once the pipe ends empty: the command's program is running."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    written = bytearray()

    def readable() -> None:
        try:
            chunk = os.read(status_r, 64)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        written.extend(chunk)
        if not chunk and not done.done():
            done.set_result(None)

    os.set_blocking(status_r, False)
    loop.add_reader(status_r, readable)
    try:
        await done
    finally:
        loop.remove_reader(status_r)
        os.close(status_r)
    if not written:
        return None
    number = int(written) if written.isdigit() else 0
    return OSError(number or errno.EIO, os.strerror(number or errno.EIO))


def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run a coroutine in the background, holding a reference until it ends."""
    task = asyncio.ensure_future(coro)
    TASKS.add(task)
    task.add_done_callback(TASKS.discard)
    return task


class Supervisor:
    def __init__(self) -> None:
        self.primary: Connection | None = None
        self.bridges: dict[int, asyncio.StreamWriter] = {}
        self.next_bridge = 0

    def key(self) -> bytes:
        with open(os.path.join(CONTROL_DIR, protocol.KEY), "rb") as fh:
            return fh.read().strip()

    async def serve_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(reader, writer)
        try:
            if await self.handshake(conn):
                self.primary = conn
                await self.requests(conn)
        except Closed:
            pass
        finally:
            for command in list(conn.commands.values()):
                await command.kill()
            if self.primary is conn:
                self.primary = None
                for bid in list(self.bridges):
                    self.close_bridge(bid)
            writer.close()

    async def handshake(self, conn: Connection) -> bool:
        return await protocol.accept(conn, self.key)

    async def requests(self, conn: Connection) -> None:
        while True:
            obj, body = await conn.receive()
            kind = obj.get("t")
            if kind == protocol.EXEC:
                started = Command(conn, obj)
                conn.commands[started.id] = started
                spawn(started.run())
            elif kind == protocol.STDIN:
                command = conn.commands.get(obj.get("id"))
                if command is not None:
                    await command.feed(body)
            elif kind == protocol.KILL:
                command = conn.commands.get(obj.get("id"))
                if command is not None:
                    await command.kill()
            elif kind in protocol.FILE_OPS:
                await self.file_op(conn, kind, obj, body)
            elif kind in (protocol.RESET, protocol.VERIFY):
                spawn(self.run_helper(conn, kind, obj))
            elif kind == protocol.PING:
                await conn.reply(obj, pid=os.getpid())
            elif kind == protocol.BRIDGE_DATA:
                await self.to_bridge(obj.get("bid"), body)
            elif kind == protocol.BRIDGE_CLOSE:
                self.close_bridge(obj.get("bid"))
            else:
                await conn.refuse(obj, protocol.UNKNOWN, f"unknown request type {kind!r}")

    async def file_op(self, conn: Connection, kind: str, obj: dict[str, Any], body: bytes) -> None:
        data = b""
        answer: dict[str, Any]
        user = user_of(obj)
        if user is None:
            await conn.refuse(obj, protocol.INVALID, f"no sandbox user {obj.get('user')!r}")
            return
        try:
            with as_user(user):
                if kind == protocol.READ:
                    answer, data = confined.read_file(str(obj["path"]), int(obj["max_bytes"]))
                elif kind == protocol.WRITE:
                    answer = confined.write_file(str(obj["path"]), str(obj.get("mode", "644")), body)
                else:
                    answer = confined.list_files(str(obj["path"]), bool(obj.get("recursive")), int(obj["max_entries"]))
        except (confined.Refused, OSError) as exc:
            answer = confined.refusal(exc)
        except (KeyError, ValueError, TypeError) as exc:
            answer = {"ok": False, "error": protocol.INVALID, "message": f"bad {kind} request: {exc}"}
        except Exception as exc:  # noqa: BLE001 - a bug in one operation must not take the control channel down; answered as io
            answer = {
                "ok": False,
                "error": "io",
                "message": f"the {kind} failed inside the sandbox ({type(exc).__name__})",
            }
        await conn.send({"t": protocol.RESULT, "id": obj.get("id"), **answer}, data)

    async def run_helper(self, conn: Connection, verb: str, obj: dict[str, Any]) -> None:
        if verb == protocol.RESET:
            answer = await self.reset()
        else:
            answer = await helper_as(AGENT, verb)
            if answer.get("ok"):
                answer["leftovers"] = answer.get("leftovers", []) + member_leftovers() + place_leftovers()
        with contextlib.suppress(Closed):
            await conn.send({"t": protocol.RESULT, "id": obj.get("id"), **answer})

    async def reset(self) -> dict[str, Any]:
        """Stop every process of the sandbox's users, have each member user that ran anything
        remove what it owns (twice, for what one left inside another's), then reset as `agent`."""
        stop_processes()
        used = [MEMBERS[name] for name in sorted(USED)]
        for _ in range(2 if len(used) > 1 else 1):
            for user in used:
                answer = await helper_as(user, "release")
                if not answer.get("ok"):
                    return answer
        answer = await helper_as(AGENT, "reset")
        if answer.get("ok"):
            USED.clear()
        return answer

    # -- bridge ---------------------------------------------------------------------------

    async def serve_bridge(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.primary
        if conn is None:
            writer.close()
            return
        self.next_bridge += 1
        bid = self.next_bridge
        self.bridges[bid] = writer
        uid = peer_uid(writer)
        user = next((name for name, p in USERS.items() if p.pw_uid == uid), None)
        try:
            await conn.send({"t": protocol.BRIDGE_OPEN, "bid": bid, "uid": uid, "user": user})
            while True:
                data = await reader.read(CHUNK)
                if not data or bid not in self.bridges:
                    break
                await conn.send({"t": protocol.BRIDGE_DATA, "bid": bid}, data)
        except (Closed, ConnectionError, OSError):
            pass
        finally:
            if self.bridges.pop(bid, None) is not None:
                writer.close()
                with contextlib.suppress(Closed):
                    await conn.send({"t": protocol.BRIDGE_CLOSE, "bid": bid})

    async def to_bridge(self, bid: Any, body: bytes) -> None:  # the frame's bid, as sent
        writer = self.bridges.get(bid)
        if writer is None:
            return
        try:
            writer.write(body)
            await writer.drain()
        except (ConnectionError, OSError):
            self.close_bridge(bid)

    def close_bridge(self, bid: Any) -> None:  # the frame's bid, as sent
        writer = self.bridges.pop(bid, None)
        if writer is not None:
            writer.close()


async def helper_as(user: pwd.struct_passwd, verb: str) -> dict[str, Any]:
    """Run `dockyard-helper <verb>` as a sandbox user; its JSON answer."""
    try:
        process = await asyncio.create_subprocess_exec(
            "/usr/bin/python3",
            "-I",
            HELPER,
            verb,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**BASE_ENV, **user_env(user)},
            cwd="/",
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=[],
            umask=UMASK,
        )
        out, err = await process.communicate()
    except OSError as exc:  # e.g. no pid to spare
        return {"ok": False, "error": "io", "message": f"could not run the helper: {exc.strerror}"}
    try:
        answer: dict[str, Any] = json.loads(out)
        return answer
    except ValueError:
        why = (err or out).decode(errors="replace").strip()[-300:]
        return {"ok": False, "error": "io", "message": f"helper {verb} as {user.pw_name} failed: {why}"}


def member_leftovers() -> list[str]:
    """Member homes that differ from a fresh one (each looked at with its owner's rights)."""
    found: list[str] = []
    for user in sorted(MEMBERS.values(), key=lambda member: member.pw_uid):
        try:
            with as_user(user):
                differ = helper.same_tree(user.pw_dir, SKEL)
        except OSError as exc:
            differ = [f"({exc.strerror})"]
        found += [f"{user.pw_dir}/{path} differs from a fresh home" for path in differ[:3]]
    return found


def place_prints() -> dict[str, dict[str, Any]]:
    """{place: what its owner may change on it}, each looked at with its owner's rights: the
    writable places, the sandbox user's home and every member's."""
    prints: dict[str, dict[str, Any]] = {}
    for user, places in ((AGENT, (*helper.SCRATCH, AGENT.pw_dir)), *((m, (m.pw_dir,)) for m in MEMBERS.values())):
        for place in places:
            try:
                with as_user(user):
                    prints[place] = helper.place_print(place)
            except OSError as exc:
                prints[place] = {"error": exc.strerror}
    return prints


# The places as this runtime had them before its first owner: what `verify` compares against.
FRESH: dict[str, dict[str, Any]] = {}


def place_leftovers() -> list[str]:
    """Places whose mode, owner or extended attributes differ from this runtime's fresh ones."""
    now = place_prints()
    return [
        f"{place} is not as fresh: {now.get(place)} (fresh: {fresh})"
        for place, fresh in sorted(FRESH.items())
        if now.get(place) != fresh
    ]


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The uid of the process at the other end of a unix socket connection (None if unknown)."""
    sock = writer.get_extra_info("socket")
    try:
        _pid, uid, _gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )
    except (OSError, AttributeError):
        return None
    return int(uid)


BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith("DOCKYARD_SUPERVISOR")}
BASE_ENV.setdefault("HOME", AGENT.pw_dir)


async def main() -> None:
    # No thread per child: a sandbox at its pids limit must not stop the supervisor noticing exits.
    try:
        os.close(os.pidfd_open(os.getpid()))
        watcher: asyncio.AbstractChildWatcher = asyncio.PidfdChildWatcher()
    except OSError:  # a kernel without pidfds (gVisor's, say): one thread per child instead
        watcher = asyncio.ThreadedChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)
    os.setgroups([])
    os.umask(UMASK)
    reaper.protect_supervisor()
    FRESH.update(place_prints())  # before any owner: this is what a fresh runtime looks like
    supervisor = Supervisor()
    control = os.path.join(CONTROL_DIR, protocol.SOCKET)
    for path in (control, BRIDGE_SOCKET):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    bridge_server = await asyncio.start_unix_server(supervisor.serve_bridge, BRIDGE_SOCKET)
    os.chmod(BRIDGE_SOCKET, 0o666)
    # Created under a temporary name, so the server never connects to a socket not yet listening.
    staging = control + ".new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(staging)
    control_server = await asyncio.start_unix_server(supervisor.serve_control, staging)
    os.chmod(staging, 0o666)  # the directory, not the socket, keeps others out
    os.rename(staging, control)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with bridge_server, control_server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
