"""The control channel's two ends against each other, over a real unix socket pair: the
server's `Link` (anyio) and the supervisor's `Connection` (asyncio, the code the image runs),
both framing through `protocol`. What one end encodes the other decodes, limits hold on both
sides, a cut frame ends the connection on both sides, and an unknown kind breaks nothing."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dockyard.config.images.sandbox import protocol
from dockyard.runtime.runtimes.supervisor import Frame, Link, SupervisorError

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
KEY = b"k" * 64

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=6,
)
objects = st.builds(
    lambda kind, fields: {**fields, "t": kind},
    st.sampled_from(sorted(protocol.KINDS)) | st.text(max_size=12),
    st.dictionaries(st.text(max_size=8), json_values, max_size=5),
)
bodies = st.binary(max_size=256)


@dataclass
class Ends:
    """The server's link and the supervisor's connection, joined by a socket pair."""

    host: Link
    image: protocol.Connection
    image_writer: asyncio.StreamWriter


@pytest.fixture
async def ends() -> AsyncIterator[Ends]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stream = await anyio.abc.UNIXSocketStream.from_socket(ours)
    reader, writer = await asyncio.open_unix_connection(sock=theirs)
    yield Ends(Link(stream, "rt_test", "c0ffee"), protocol.Connection(reader, writer), writer)
    writer.close()
    await stream.aclose()


async def host_to_image(ends: Ends, obj: dict[str, Any], body: bytes = b"") -> tuple[dict[str, Any], bytes]:
    """Send from the server's end while the supervisor's reads (a large frame fills the socket)."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(ends.host.send, obj, body)
        return await ends.image.receive()


async def image_to_host(ends: Ends, obj: dict[str, Any], body: bytes = b"") -> Frame:
    async with anyio.create_task_group() as tg:
        tg.start_soon(ends.image.send, obj, body)
        return await ends.host._receive()


# -- encode and decode, both ways ------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(obj=objects, body=bodies)
def test_decode_gives_back_what_encode_made(obj: dict[str, Any], body: bytes) -> None:
    assert protocol.decode(protocol.encode(obj, body)) == (obj, body, b"")


@settings(max_examples=30, deadline=None)
@given(frames=st.lists(st.tuples(objects, bodies), min_size=1, max_size=3), cut=st.data())
def test_frames_in_a_stream_split_where_they_end_and_a_prefix_is_incomplete(
    frames: list[tuple[dict[str, Any], bytes]], cut: st.DataObject
) -> None:
    data = b"".join(protocol.encode(obj, body) for obj, body in frames)
    first = protocol.encode(*frames[0])
    short = cut.draw(st.integers(0, len(first) - 1))
    assert protocol.decode(data[:short]) is None
    found = []
    while data:
        decoded = protocol.decode(data)
        assert decoded is not None
        obj, body, data = decoded
        found.append((obj, body))
    assert found == frames


@pytest.mark.parametrize(
    ("obj", "body"),
    [
        ({"t": protocol.PING, "id": 1}, b""),  # empty payload
        ({"t": protocol.WRITE, "id": 2, "path": "a/ü b.txt", "mode": "644"}, b"\x00\xff" * 5000),
        ({"t": protocol.STDIN, "id": 3}, b""),  # an empty stdin body closes the command's stdin
        ({"t": protocol.BRIDGE_DATA, "bid": 7}, b'{"jsonrpc": "2.0"}\n'),
    ],
)
async def test_what_the_server_sends_the_supervisor_reads(ends: Ends, obj: dict[str, Any], body: bytes) -> None:
    assert await host_to_image(ends, obj, body) == (obj, body)


@pytest.mark.parametrize(
    ("obj", "body"),
    [
        ({"t": protocol.OUT, "id": 1, "fd": 2}, b"oops\n"),
        ({"t": protocol.EXIT, "id": 1, "code": 0, "timed_out": False, "dropped": [0, 0]}, b""),
        ({"t": protocol.BRIDGE_OPEN, "bid": 1, "uid": 1000, "user": "agent"}, b""),
    ],
)
async def test_what_the_supervisor_sends_the_server_reads(ends: Ends, obj: dict[str, Any], body: bytes) -> None:
    frame = await image_to_host(ends, obj, body)
    assert (frame.obj, frame.body, frame.kind) == (obj, body, obj["t"])


async def test_a_reply_reaches_the_server_as_a_result_of_its_request(ends: Ends) -> None:
    async with ends.host.request({"t": protocol.READ, "path": "f", "max_bytes": 10}) as (request_id, frames):
        request, _ = await ends.image.receive()
        assert request == {"t": protocol.READ, "path": "f", "max_bytes": 10, "id": request_id}
        await ends.image.reply(request, b"contents", path="f", size=8, truncated=False)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ends.host.serve, None, tg)
            answer = await frames.receive()
            tg.cancel_scope.cancel()
    assert (answer.kind, answer.obj["id"], answer.obj["ok"], answer.body) == (
        protocol.RESULT,
        request_id,
        True,
        b"contents",
    )


# -- limits ----------------------------------------------------------------------------------


def _object_of_size(size: int) -> dict[str, Any]:
    base = {"t": protocol.RESULT, "id": 1, "pad": ""}
    obj = {**base, "pad": "x" * (size - len(json.dumps(base)))}
    assert len(json.dumps(obj).encode()) == size
    return obj


async def test_an_object_of_the_largest_size_passes_both_ways(ends: Ends) -> None:
    largest = _object_of_size(protocol.MAX_OBJECT)
    assert await host_to_image(ends, largest) == (largest, b"")
    assert (await image_to_host(ends, largest)).obj == largest


async def test_a_frame_over_a_limit_is_refused_before_a_byte_is_sent_and_the_link_stays_up(ends: Ends) -> None:
    with pytest.raises(SupervisorError, match="cannot be sent"):
        await ends.host.send(_object_of_size(protocol.MAX_OBJECT + 1))
    with pytest.raises(SupervisorError, match="cannot be sent"):
        await ends.host.send({"t": protocol.WRITE, "id": 1}, bytes(protocol.MAX_BODY + 1))
    with pytest.raises(protocol.FrameError):
        await ends.image.send({"t": protocol.OUT, "id": 1}, bytes(protocol.MAX_BODY + 1))
    assert not ends.host.closed
    await ends.host.send({"t": protocol.PING, "id": 9})
    assert await ends.image.receive() == ({"t": protocol.PING, "id": 9}, b"")


@pytest.mark.parametrize("sizes", [(protocol.MAX_OBJECT + 1, 0), (2, protocol.MAX_BODY + 1)])
async def test_a_header_over_a_limit_ends_the_connection_on_both_sides_before_its_payload_is_read(
    ends: Ends, sizes: tuple[int, int]
) -> None:
    header = protocol.HEADER.pack(*sizes)
    assert protocol.sizes(protocol.HEADER.pack(protocol.MAX_OBJECT, protocol.MAX_BODY)) == (
        protocol.MAX_OBJECT,
        protocol.MAX_BODY,
    )
    with pytest.raises(protocol.FrameError):
        protocol.sizes(header)
    await ends.host._stream.send(header)
    with pytest.raises(protocol.Closed, match="too large"):
        await ends.image.receive()
    ends.image_writer.write(header)
    await ends.image_writer.drain()
    with pytest.raises(SupervisorError, match="too large"):
        await ends.host._receive()


async def test_an_object_that_is_not_a_json_object_is_refused_on_both_sides(ends: Ends) -> None:
    for data in (b"[1, 2]", b"{not json"):
        frame = protocol.HEADER.pack(len(data), 0) + data
        await ends.host._stream.send(frame)
        with pytest.raises(protocol.Closed):
            await ends.image.receive()
        ends.image_writer.write(frame)
        await ends.image_writer.drain()
        with pytest.raises(SupervisorError, match="broke the protocol"):
            await ends.host._receive()


# -- truncated frames ------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [3, protocol.HEADER.size, protocol.HEADER.size + 5, -1])
async def test_a_frame_cut_short_by_the_server_ends_the_supervisors_connection(ends: Ends, keep: int) -> None:
    frame = protocol.encode({"t": protocol.WRITE, "id": 1, "path": "f"}, b"body")
    await ends.host._stream.send(frame[:keep])
    await ends.host._stream.send_eof()
    with pytest.raises(protocol.Closed):
        await ends.image.receive()


@pytest.mark.parametrize("keep", [3, protocol.HEADER.size, protocol.HEADER.size + 5, -1])
async def test_a_frame_cut_short_by_the_supervisor_ends_the_link_and_its_waiters(ends: Ends, keep: int) -> None:
    async with ends.host.request({"t": protocol.PING}) as (request_id, frames):
        frame = protocol.encode({"t": protocol.RESULT, "id": request_id, "ok": True}, b"body")
        ends.image_writer.write(frame[:keep])
        ends.image_writer.write_eof()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ends.host.serve, None, tg)
            assert [f async for f in frames] == []  # the waiter sees the end, not a half frame
    assert ends.host.closed


# -- kinds -----------------------------------------------------------------------------------


async def test_a_frame_of_an_unknown_kind_is_passed_over_and_the_link_keeps_serving(ends: Ends) -> None:
    await ends.host.send({"t": "frobnicate", "id": 5})
    request, _ = await ends.image.receive()
    assert request["t"] not in protocol.KINDS
    await ends.image.refuse(request, protocol.UNKNOWN, "unknown request type 'frobnicate'")
    refusal = await ends.host._receive()
    assert (refusal.kind, refusal.obj["ok"], refusal.obj["error"]) == (protocol.RESULT, False, protocol.UNKNOWN)

    async with ends.host.request({"t": protocol.PING}) as (request_id, frames):
        await ends.image.send({"t": "frobnicate", "id": request_id + 100})  # answers nothing
        await ends.image.send({"t": "bridge_frobnicate", "bid": 3})
        await ends.image.reply({"id": request_id}, pid=1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(ends.host.serve, None, tg)
            answer = await frames.receive()
            tg.cancel_scope.cancel()
    assert (answer.kind, answer.obj["pid"]) == (protocol.RESULT, 1)


def _is_frame_kind(node: ast.expr) -> bool:
    """`frame.kind` (or `hello.kind`, `ready.kind`): a received frame's kind, not a template's."""
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "kind"
        and isinstance(node.value, ast.Name)
        and node.value.id in ("frame", "hello", "ready")
    )


def _kind_literals(path: Path) -> set[str]:
    """Every string written as a frame's kind in a file: `{"t": "..."}` and `frame.kind == "..."`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "t" and isinstance(value, ast.Constant):
                    found.add(value.value)
        elif isinstance(node, ast.Compare) and _is_frame_kind(node.left):
            found |= {c.value for c in node.comparators if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return found


def test_every_kind_either_end_writes_out_is_one_the_protocol_defines() -> None:
    ends = [
        *(ROOT / "config/images/sandbox").glob("*.py"),
        ROOT / "runtime/runtimes/supervisor.py",
        ROOT / "runtime/runtimes/commands.py",
        ROOT / "runtime/runtimes/files.py",
        ROOT / "runtime/runtimes/provision.py",
    ]
    written = {path.name: _kind_literals(path) - protocol.KINDS for path in ends}
    assert {name: kinds for name, kinds in written.items() if kinds} == {}


# -- the handshake and the bridge's first line -----------------------------------------------


async def test_the_handshake_succeeds_when_both_ends_hold_the_key(ends: Ends) -> None:
    async with anyio.create_task_group() as tg:
        accepted: list[bool] = []

        async def supervisor() -> None:
            accepted.append(await protocol.accept(ends.image, lambda: KEY))

        tg.start_soon(supervisor)
        await ends.host.handshake(KEY)
    assert accepted == [True]
    assert ends.host.supervisor_pid == os.getpid()


async def test_the_handshake_is_refused_by_a_supervisor_holding_another_key(ends: Ends) -> None:
    async with anyio.create_task_group() as tg:
        accepted: list[bool] = []

        async def supervisor() -> None:
            accepted.append(await protocol.accept(ends.image, lambda: b"another key"))

        tg.start_soon(supervisor)
        with pytest.raises(SupervisorError, match="refused the connection: bad proof"):
            await ends.host.handshake(KEY)
    assert accepted == [False]


async def test_the_handshake_is_refused_by_a_supervisor_that_cannot_read_its_key(ends: Ends) -> None:
    def no_key() -> bytes:
        raise FileNotFoundError(2, "No such file or directory")

    async with anyio.create_task_group() as tg:
        tg.start_soon(protocol.accept, ends.image, no_key)
        with pytest.raises(SupervisorError, match="no key: No such file or directory"):
            await ends.host.handshake(KEY)


def test_the_proofs_of_the_two_roles_differ_and_depend_on_key_and_nonce() -> None:
    proofs = {
        protocol.proof(key, role, nonce)
        for key in (b"a", b"b")
        for role in ("server", "supervisor")
        for nonce in ("1", "2")
    }
    assert len(proofs) == 8


@settings(max_examples=40, deadline=None)
@given(token=st.text(max_size=80))
def test_the_token_line_the_bridge_sends_is_the_token_the_server_reads(token: str) -> None:
    line = protocol.token_line(token)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert protocol.presented_token(line.decode()[:-1]) == token


@pytest.mark.parametrize(
    "line",
    [
        None,
        "",
        '{"jsonrpc": "2.0", "id": 1, "method": "initialize"}',
        '{"dockyard_token": 5}',
        '{"dockyard_token": "dyt_x", "more": 1}',
        "not json",
        '["dockyard_token"]',
    ],
)
def test_any_other_first_line_presents_no_token(line: str | None) -> None:
    assert protocol.presented_token(line) is None
