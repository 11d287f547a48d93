"""Host-side endpoints against other local users: an exposed preview and a computer's DevTools
relay listen on 127.0.0.1 of this machine, where any user or process can connect. Only those
holding an endpoint's secret get through; the rest get a short refusal, and nothing of what
they send reaches the sandbox or the browser."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.parse
from pathlib import Path

import anyio
import docker
import pytest
from mcp import Client

from tests.conftest import call, sh
from tests.tools.test_computers import computer_server, ref, screenshot, serve_app

pytestmark = pytest.mark.anyio

PAGE = "<title>Ledger of A</title><h1>balance 4217</h1>"

# A server inside the sandbox that writes down every byte it receives, answers a request head
# with 101 and then echoes what follows in upper case: what a WebSocket needs of the relay.
RECORDER = r"""
import socket, threading
server = socket.create_server(("127.0.0.1", 8001))
def handle(conn):
    with conn, open("/workspace/seen.log", "ab", buffering=0) as log:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
            log.write(chunk)
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")
        while chunk := conn.recv(65536):
            log.write(chunk)
            conn.sendall(chunk.upper())
while True:
    conn, _ = server.accept()
    threading.Thread(target=handle, args=(conn,), daemon=True).start()
"""


def exchange(port: int, data: bytes, *, timeout_s: float = 5.0, keep_open: bool = False) -> bytes:
    """Send `data` to 127.0.0.1:port and read until the other side closes (or the timeout)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as conn:
        deadline = time.monotonic() + timeout_s
        try:
            conn.sendall(data)
            if not keep_open:
                conn.shutdown(socket.SHUT_WR)
            while time.monotonic() < deadline and (chunk := conn.recv(65536)):
                received += chunk
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass  # the listener may close on a client it has refused before reading all it sent
    return received


def get(port: int, target: str, *headers: str) -> bytes:
    head = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n" + "".join(
        f"{h}\r\n" for h in headers
    )
    return exchange(port, (head + "\r\n").encode(), keep_open=True)


def split_url(url: str) -> tuple[int, str]:
    """(host port, key) of a preview URL; the key is empty if it carries none."""
    parts = urllib.parse.urlsplit(url)
    assert parts.hostname == "127.0.0.1" and parts.port, url
    return parts.port, urllib.parse.parse_qs(parts.query).get("dockyard_key", [""])[0]


async def serve_page(client: Client) -> tuple[str, str]:
    """A sandbox (network none) serving PAGE with python's http.server: (sandbox_id, preview url)."""
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    await call(client, "sandbox_write_file", sandbox_id=sid, path="site/index.html", content=PAGE)
    await sh(client, sid, "cd site && (nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &)")
    url = (await call(client, "sandbox_expose_port", sandbox_id=sid, port=8000))["url"]
    with anyio.fail_after(30):
        while "balance" not in (await sh(client, sid, "curl -s http://127.0.0.1:8000/ || true"))["stdout"]:
            await anyio.sleep(0.2)
    return sid, url


async def test_a_preview_answers_its_link_its_cookie_and_its_bearer_token_and_refuses_anyone_else(
    client: Client,
) -> None:
    _, url = await serve_page(client)
    port, key = split_url(url)
    target = urllib.parse.urlsplit(url)
    link = f"{target.path}?{target.query}"

    refused = {
        "no key": (await anyio.to_thread.run_sync(get, port, "/"), b"401"),
        "wrong cookie": (
            await anyio.to_thread.run_sync(get, port, "/", f"Cookie: dockyard_preview_{port}=guess"),
            b"403",
        ),
        "another preview's cookie": (
            await anyio.to_thread.run_sync(get, port, "/", f"Cookie: dockyard_preview_{port + 1}={key}"),
            b"401",
        ),
        "wrong bearer": (await anyio.to_thread.run_sync(get, port, "/", "Authorization: Bearer guess"), b"403"),
        "wrong link": (await anyio.to_thread.run_sync(get, port, "/?dockyard_key=guess"), b"403"),
        "key in another field": (await anyio.to_thread.run_sync(get, port, "/", f"X-Key: {key}"), b"401"),
    }
    for why, (answer, status) in refused.items():
        assert answer.startswith(b"HTTP/1.1 " + status) and b"balance" not in answer, (why, answer[:300])

    redirect = await anyio.to_thread.run_sync(get, port, link)
    head = redirect.split(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 303"), redirect[:300]
    assert "\r\nLocation: /\r\n" in head  # the same URL, without the key
    cookie = next(line for line in head.split("\r\n") if line.startswith("Set-Cookie: "))
    assert (
        cookie.startswith(f"Set-Cookie: dockyard_preview_{port}={key};")
        and "HttpOnly" in cookie
        and "SameSite=Strict" in cookie
    )
    assert b"balance" not in redirect

    given = cookie.removeprefix("Set-Cookie: ").split(";")[0]
    admitted = [  # the redirect's target with the cookie it set, then a script's bearer header
        await anyio.to_thread.run_sync(get, port, "/", f"Cookie: theme=dark; {given}"),
        await anyio.to_thread.run_sync(get, port, "/", f"Authorization: Bearer {key}"),
    ]
    for answer in admitted:
        assert answer.startswith(b"HTTP/1.0 200") and b"balance 4217" in answer, answer[:300]


async def test_garbage_or_silence_on_a_preview_port_reaches_nothing_and_the_listener_serves_on(client: Client) -> None:
    """A client that sends garbage, nothing, an endless head or no key is answered (or dropped)
    within bounds, the sandbox's server receives none of it, and an admitted connection is then
    relayed raw both ways (what a WebSocket needs), with the key kept from the sandbox."""
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    await call(client, "sandbox_write_file", sandbox_id=sid, path="recorder.py", content=RECORDER)
    await sh(client, sid, "(nohup python3 recorder.py >/tmp/recorder.log 2>&1 &); sleep 0.5; touch seen.log")
    port, key = split_url((await call(client, "sandbox_expose_port", sandbox_id=sid, port=8001))["url"])

    started = time.monotonic()
    garbage = await anyio.to_thread.run_sync(lambda: exchange(port, b"\x16\x03\x01\x02\x00\x01\xff garbage\r\n\r\n"))
    assert garbage.startswith(b"HTTP/1.1 400")
    silent = await anyio.to_thread.run_sync(lambda: exchange(port, b"", keep_open=True, timeout_s=20))
    endless = await anyio.to_thread.run_sync(
        lambda: exchange(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 40_000, keep_open=True, timeout_s=20)
    )
    assert b"101" not in silent + endless
    anonymous = await anyio.to_thread.run_sync(
        lambda: exchange(port, b"GET /chat HTTP/1.1\r\nUpgrade: websocket\r\n\r\nhello")
    )
    assert anonymous.startswith(b"HTTP/1.1 401")
    assert time.monotonic() - started < 40, "a client that sends nothing must be dropped within bounds"

    def talk() -> list[bytes]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(f"GET /chat HTTP/1.1\r\nUpgrade: websocket\r\nAuthorization: Bearer {key}\r\n\r\n".encode())
            replies = [conn.recv(65536)]
            for word in (b"ping", b"again"):
                conn.sendall(word)
                replies.append(conn.recv(65536))
            return replies

    upgraded, *echoes = await anyio.to_thread.run_sync(talk)
    assert upgraded.startswith(b"HTTP/1.1 101") and echoes == [b"PING", b"AGAIN"]
    seen = (await call(client, "sandbox_read_file", sandbox_id=sid, path="seen.log"))["content"]
    assert seen.startswith("GET /chat HTTP/1.1\r\nUpgrade: websocket\r\n\r\n") and seen.endswith("pingagain"), seen[
        :300
    ]
    assert "garbage" not in seen and "hello" not in seen and "aaaa" not in seen and key not in seen


def listening_ports(pid: int) -> set[int]:
    """Every TCP port on 127.0.0.1 that `pid` or one of its descendants listens on."""
    family = {pid}
    for _ in range(10):
        for entry in Path("/proc").iterdir():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) if entry.name.isdigit() else 0
            except (OSError, IndexError, ValueError):
                continue
            if ppid in family:
                family.add(int(entry.name))
    inodes = set()
    for member in family:
        try:
            fds = list((Path("/proc") / str(member) / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue  # closed meanwhile (the listing's own fd among them)
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        address, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and address.startswith("0100007F:") and inode in inodes:
            ports.add(int(address.split(":")[1], 16))
    return ports


# What another local user tries on each port: the DevTools listing and version, a WebSocket to
# the browser (with the id the listing gave, if any) and, once upgraded, a command to list tabs.
PROBE = r"""
import base64, json, os, socket, sys
def talk(port, data, more=None):
    got = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
            conn.sendall(data)
            while len(got) < 65536:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                got += chunk
                if got.startswith(b"HTTP/1.1 101") and more is not None:
                    conn.sendall(more)
                    more = None
                    got += conn.recv(65536)
                    break
    except OSError as exc:
        if not got:
            return "error: " + str(exc)
    return got.decode("latin-1")
report = {"uid": os.getuid()}
for port in json.loads(sys.argv[1]):
    host = "Host: 127.0.0.1:%d\r\n" % port
    answers = [talk(port, ("GET %s HTTP/1.1\r\n%sConnection: close\r\n\r\n" % (path, host)).encode()) for path in ("/json/list", "/json/version", "/")]
    browser = "/devtools/browser/x"
    for answer in answers:
        if "/devtools/browser/" in answer:
            browser = "/devtools/browser/" + answer.split("/devtools/browser/")[1].split('"')[0]
    command = json.dumps({"id": 1, "method": "Target.getTargets"}).encode()
    frame = bytes([0x81, 0x80 | len(command)]) + b"\0\0\0\0" + command
    upgrade = ("GET %s HTTP/1.1\r\n%sUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n"
               % (browser, host, base64.b64encode(os.urandom(16)).decode())).encode()
    answers.append(talk(port, upgrade, frame))
    report[port] = answers
print(json.dumps(report))
"""


async def test_user_nobody_cannot_read_a_preview_nor_list_or_drive_a_computers_browser(
    tmp_path: Path, computer_image: str, docker_client: docker.DockerClient
) -> None:
    async with computer_server(tmp_path, docker_client) as (client, _):
        _, url = await serve_page(client)
        preview_port, _ = split_url(url)
        cid = (await call(client, "computer_create"))["computer_id"]
        assert (await call(client, "computer_navigate", computer_id=cid, url=url))["title"] == "Ledger of A"

        ports = listening_ports(os.getpid())
        assert preview_port in ports and len(ports) >= 2, ports  # the preview and the computer's relay at least
        probe = [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            PROBE,
            json.dumps(sorted(ports)),
        ]
        done = await anyio.to_thread.run_sync(
            lambda: subprocess.run(probe, capture_output=True, text=True, timeout=120, check=False)
        )
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report.pop("uid") != os.getuid()
        telling = ("Ledger of A", "balance", "webSocketDebuggerUrl", "targetInfos", '"type": "page"')
        leaks = [
            (port, answer.split("\r\n")[0][:40], [word for word in telling if word in answer])
            for port, answers in report.items()
            for answer in answers
            if any(word in answer for word in telling)
            or answer.startswith("HTTP/1.1 101")
            or not answer.startswith(("HTTP/1.1 401", "HTTP/1.1 403", "HTTP/1.1 400", "error:"))
        ]
        assert leaks == [], leaks

        # The owner's computer is untouched and still reads its page.
        assert 'heading "balance 4217"' in (await call(client, "computer_snapshot", computer_id=cid))["snapshot"]


async def test_a_computer_opens_and_screenshots_a_preview_that_refuses_everyone_without_its_key(
    tmp_path: Path, computer_image: str, docker_client: docker.DockerClient
) -> None:
    async with computer_server(tmp_path, docker_client) as (client, _):
        _, url = await serve_app(client)
        port, _ = split_url(url)
        assert (await anyio.to_thread.run_sync(get, port, "/")).startswith(b"HTTP/1.1 401")
        cid = (await call(client, "computer_create"))["computer_id"]
        opened = await call(client, "computer_navigate", computer_id=cid, url=url)
        assert (
            opened["title"] == "Greeter" and opened["url"] == f"http://127.0.0.1:{port}/"
        )  # the key never in the page's address
        page = (await call(client, "computer_snapshot", computer_id=cid))["snapshot"]
        await call(client, "computer_click", computer_id=cid, ref=ref(page, "button", "Paint it red"))
        assert 'heading "Painted"' in (await call(client, "computer_snapshot", computer_id=cid))["snapshot"]
        width, height, png = await screenshot(client, cid)
        assert (width, height) == (1280, 800) and len(png) > 1000
        # The page's own script cannot read the key: the cookie that carries it is HttpOnly.
        assert "dockyard" not in (await call(client, "computer_snapshot", computer_id=cid))["snapshot"]
        # A second preview, opened after the first one's cookie is in the browser, gets its own key.
        _, other = await serve_page(client)
        assert (await call(client, "computer_navigate", computer_id=cid, url=other))["title"] == "Ledger of A"


# A keep-alive HTTP/1.1 server inside the sandbox that writes down the cookies of every request.
COOKIE_LOGGER = r"""
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        with open("/workspace/cookies.log", "a") as log:
            log.write(repr(self.headers.get_all("Cookie")) + "\n")
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", 8002), Handler).serve_forever()
"""


def keep_alive_twice(port: int, cookies: str) -> list[bytes]:
    """Two requests on one connection, as a browser holding every preview's cookie sends them."""
    head = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: keep-alive\r\nCookie: {cookies}\r\n\r\n".encode()
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        for _ in range(2):
            try:
                conn.sendall(head)
                got = b""
                while not got.endswith(b"ok") and (chunk := conn.recv(65536)):
                    got += chunk
            except (TimeoutError, ConnectionResetError, BrokenPipeError):
                got = b""
            answers.append(got)
    return answers


async def test_a_preview_never_sees_the_keys_a_browser_sends_on_a_kept_alive_connection(client: Client) -> None:
    """A browser sends every 127.0.0.1 cookie to every port, this preview's key and another's
    among them; only a connection's first request passes the gate, so none may be kept alive."""
    sid = (await call(client, "sandbox_create"))["sandbox_id"]
    await call(client, "sandbox_write_file", sandbox_id=sid, path="logger.py", content=COOKIE_LOGGER)
    await sh(client, sid, "(nohup python3 logger.py >/dev/null 2>&1 &); sleep 0.5")
    port, key = split_url((await call(client, "sandbox_expose_port", sandbox_id=sid, port=8002))["url"])
    other_key = "another-previews-key-of-another-tenant"
    cookies = f"theme=dark; dockyard_preview_{port}={key}; dockyard_preview_{port + 7}={other_key}"
    for _ in range(3):
        answers = await anyio.to_thread.run_sync(keep_alive_twice, port, cookies)
        assert answers[0].startswith(b"HTTP/1.1 200") and answers[1] == b"", answers  # the server closed after one
    seen = (await call(client, "sandbox_read_file", sandbox_id=sid, path="cookies.log"))["content"]
    assert "theme=dark" in seen  # the sandbox's own cookies still reach it
    assert "dockyard_preview_" not in seen and key not in seen and other_key not in seen, seen
