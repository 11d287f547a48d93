"""The control channel between the dockyard server and a sandbox's supervisor, defined once.

Both ends import this file: inside the image it lies beside supervisor.py and bridge.py in
/usr/local/lib/dockyard (plain standard-library Python 3.11, as everything there), and the
server imports it as `dockyard.config.images.sandbox.protocol`. The requests and their answers
are documented in supervisor.py; this file holds what both ends must agree on byte for byte.

Frame: 8 bytes (two big-endian u32: the length of a JSON object, the length of a binary body),
then the JSON object (UTF-8), then the body. Every object has a kind "t" (see KINDS); a frame
whose object or body is over its limit is refused by both ends, before it is read or sent.

Handshake, mutual, with the key the server wrote to `key` beside the socket: each side proves
it holds the key with `proof(key, role, nonce)`, an HMAC-SHA256 over the other side's nonce.
"""

import hashlib
import hmac
import json
import os
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncio

VERSION = 1

# Where things are: the control socket and its key in a directory the server bind-mounts from
# the host (only root may enter its parent inside the sandbox), and the bridge's socket.
CONTROL_DIR = "/run/dockyard-sup/control"
SOCKET = "control.sock"
KEY = "key"
BRIDGE_SOCKET = "/run/dockyard/bridge.sock"

HEADER = struct.Struct("!II")
MAX_OBJECT = 1 << 20
MAX_BODY = 64 << 20
CHUNK = 64 << 10  # how much of a stream one frame carries at most
HANDSHAKE_TIMEOUT_S = 10.0

# The kinds of frames ("t"). Handshake:
HELLO = "hello"  # supervisor: {protocol, nonce}
AUTH = "auth"  # server: {protocol, nonce, proof}
READY = "ready"  # supervisor: {protocol, pid, proof}
REFUSED = "refused"  # supervisor: {message}, then it closes
# Requests (server -> supervisor, each with the server's "id") and what answers them:
EXEC = "exec"  # -> OUT..., EXIT
STDIN = "stdin"
KILL = "kill"
READ = "read"  # -> RESULT + the file's bytes
WRITE = "write"  # + bytes -> RESULT
LIST = "list"  # -> RESULT
RESET = "reset"  # -> RESULT
VERIFY = "verify"  # -> RESULT
PING = "ping"  # -> RESULT
OUT = "out"  # {id, fd: 1|2} + bytes
EXIT = "exit"  # {id, code, timed_out, dropped, ...}
RESULT = "result"  # {id, ok: true, ...} or {id, ok: false, error, message}
# Bridge sessions (both ways, by the supervisor's "bid"):
BRIDGE_OPEN = "bridge_open"  # supervisor: {bid, uid, user}
BRIDGE_DATA = "bridge_data"  # {bid} + bytes
BRIDGE_CLOSE = "bridge_close"  # {bid}

HANDSHAKE = (HELLO, AUTH, READY, REFUSED)
REQUESTS = (EXEC, STDIN, KILL, READ, WRITE, LIST, RESET, VERIFY, PING)
ANSWERS = (OUT, EXIT, RESULT)
BRIDGE = (BRIDGE_OPEN, BRIDGE_DATA, BRIDGE_CLOSE)
KINDS = frozenset(HANDSHAKE + REQUESTS + ANSWERS + BRIDGE)
FILE_OPS = (READ, WRITE, LIST)

# The `error` of a failed RESULT that the supervisor itself gives (file operations add theirs).
UNKNOWN = "unknown"  # a request of a kind the supervisor does not serve
INVALID = "invalid"  # a request it cannot read, or for a user the sandbox does not have

# The first line a bridge session may send, to act as a token instead of the sandbox's owner.
TOKEN_FIELD = "dockyard_token"


class FrameError(ValueError):
    """A frame breaks the protocol: over a limit, or its object is not a JSON object."""


def encode(obj: dict[str, Any], body: bytes = b"") -> bytes:
    """One frame's bytes."""
    data = json.dumps(obj).encode()
    check_sizes(len(data), len(body))
    return HEADER.pack(len(data), len(body)) + data + body


def sizes(header: bytes) -> tuple[int, int]:
    """The object's and the body's length from a frame's header (refused when over the limits)."""
    size, body_size = HEADER.unpack(header)
    check_sizes(size, body_size)
    return size, body_size


def check_sizes(size: int, body_size: int) -> None:
    """Refuse a frame whose object or body is over its limit."""
    if size > MAX_OBJECT or body_size > MAX_BODY:
        raise FrameError(f"frame too large ({size} + {body_size} bytes; at most {MAX_OBJECT} + {MAX_BODY})")


def parse(data: bytes) -> dict[str, Any]:
    """A frame's object from its bytes."""
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise FrameError(f"a frame's object is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise FrameError("a frame's object must be a JSON object")
    return obj


def decode(data: bytes) -> tuple[dict[str, Any], bytes, bytes] | None:
    """The first frame in `data`: (object, body, the bytes after it), or None while incomplete
    (each end's stream reader does the same, a read at a time)."""
    if len(data) < HEADER.size:
        return None
    size, body_size = sizes(data[: HEADER.size])
    end = HEADER.size + size + body_size
    if len(data) < end:
        return None
    return parse(data[HEADER.size : HEADER.size + size]), data[HEADER.size + size : end], data[end:]


def proof(key: bytes, role: str, nonce: str) -> str:
    """What `role` ("server" or "supervisor") sends to show it holds `key`."""
    return hmac.new(key, f"{role}:{nonce}".encode(), hashlib.sha256).hexdigest()


def token_line(token: str) -> bytes:
    """The line a bridge session starts with to act as `token`."""
    return json.dumps({TOKEN_FIELD: token}).encode() + b"\n"


def presented_token(line: str | None) -> str | None:
    """The token in a bridge session's first line; None for anything else (JSON-RPC)."""
    try:
        obj = json.loads(line) if line else None
    except ValueError:
        return None
    token = obj.get(TOKEN_FIELD) if isinstance(obj, dict) and list(obj) == [TOKEN_FIELD] else None
    return token if isinstance(token, str) else None


# -- the supervisor's end (asyncio streams) ---------------------------------------------------
# asyncio is imported where it is used: dockyard-bridge reads this file too, and starts about
# 25 ms sooner without it.


class Closed(Exception):
    """The connection ended or broke the protocol."""


class Connection:
    """One framed connection; writes are serialised, reads are the caller's loop."""

    def __init__(self, reader: "asyncio.StreamReader", writer: "asyncio.StreamWriter") -> None:
        import asyncio

        self.reader = reader
        self.writer = writer
        self.lock = asyncio.Lock()

    async def send(self, obj: dict[str, Any], body: bytes = b"") -> None:
        frame = encode(obj, body)
        async with self.lock:
            self.writer.write(frame)
            try:
                await self.writer.drain()
            except (ConnectionError, OSError) as exc:
                raise Closed(str(exc)) from exc

    async def receive(self) -> tuple[dict[str, Any], bytes]:
        import asyncio

        try:
            size, body_size = sizes(await self.reader.readexactly(HEADER.size))
            obj = parse(await self.reader.readexactly(size))
            body = await self.reader.readexactly(body_size) if body_size else b""
        except (asyncio.IncompleteReadError, ConnectionError, FrameError) as exc:
            raise Closed(str(exc)) from exc
        return obj, body

    async def reply(self, request: dict[str, Any], body: bytes = b"", **fields: Any) -> None:
        await self.send({"t": RESULT, "id": request.get("id"), "ok": True, **fields}, body)

    async def refuse(self, request: dict[str, Any], error: str, message: str) -> None:
        await self.send({"t": RESULT, "id": request.get("id"), "ok": False, "error": error, "message": message})


async def accept(conn: Connection, read_key: Callable[[], bytes]) -> bool:
    """The supervisor's side of the handshake: True once the server proved it holds the key
    (and was sent the supervisor's proof), False after a refusal or silence."""
    import asyncio

    nonce = os.urandom(16).hex()
    await conn.send({"t": HELLO, "protocol": VERSION, "nonce": nonce})
    try:
        obj, _ = await asyncio.wait_for(conn.receive(), HANDSHAKE_TIMEOUT_S)
    except TimeoutError:
        return False
    try:
        key = read_key()
    except OSError as exc:
        await conn.send({"t": REFUSED, "message": f"no key: {exc.strerror}"})
        return False
    if obj.get("t") != AUTH or obj.get("protocol") != VERSION:
        await conn.send({"t": REFUSED, "message": f"expected auth for protocol {VERSION}"})
        return False
    if not hmac.compare_digest(str(obj.get("proof", "")), proof(key, "server", nonce)):
        await conn.send({"t": REFUSED, "message": "bad proof"})
        return False
    await conn.send(
        {
            "t": READY,
            "protocol": VERSION,
            "pid": os.getpid(),
            "proof": proof(key, "supervisor", str(obj.get("nonce", ""))),
        }
    )
    return True
