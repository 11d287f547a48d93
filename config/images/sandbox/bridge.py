#!/usr/bin/python3
"""dockyard-bridge: dockyard's tools for whatever runs inside this sandbox.

Speaks MCP over stdio (newline-delimited JSON-RPC): point an MCP client's stdio transport at
this command. Each message is relayed through the sandbox's supervisor to the dockyard server,
which answers as this sandbox's owner. No network is needed.

With DOCKYARD_TOKEN in the environment (a dispatch's runner has its run's token there), the
session first sends one line, `{"dockyard_token": "<token>"}`, and the server acts as that
token instead, provided it is bound to this sandbox; any other token ends the session unserved.
MCP clients often start a server with only a few of their variables (the official SDK's stdio
client passes PATH, HOME and the like): hand DOCKYARD_TOKEN on explicitly, as dockyard-call does.
"""

import os
import socket
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))  # protocol.py lies beside this file
from protocol import BRIDGE_SOCKET as SOCKET
from protocol import CHUNK, token_line


def upstream(conn: socket.socket) -> None:
    """stdin -> supervisor; EOF on stdin ends the session."""
    try:
        while True:
            data = os.read(0, CHUNK)
            if not data:
                break
            conn.sendall(data)
    except OSError:
        pass
    finally:
        try:
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def main() -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(SOCKET)
    except OSError as exc:
        sys.stderr.write(f"dockyard-bridge: cannot reach the sandbox supervisor at {SOCKET}: {exc.strerror}\n")
        return 1
    token = os.environ.get("DOCKYARD_TOKEN")
    if token:
        conn.sendall(token_line(token))
    threading.Thread(target=upstream, args=(conn,), daemon=True).start()
    answered = False
    while True:
        data = conn.recv(CHUNK)
        if not data:
            if token and not answered:
                sys.stderr.write(
                    "dockyard-bridge: the server closed the session unanswered; it serves DOCKYARD_TOKEN only "
                    "while that token is valid and bound to this sandbox\n"
                )
                return 1
            return 0
        answered = True
        view = memoryview(data)
        while view:
            view = view[os.write(1, view) :]


if __name__ == "__main__":
    sys.exit(main())
