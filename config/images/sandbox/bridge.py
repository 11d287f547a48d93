#!/usr/bin/python3
"""dockyard-bridge: dockyard's tools for whatever runs inside this sandbox.

Speaks MCP over stdio (newline-delimited JSON-RPC): point an MCP client's stdio transport at
this command. Each message is relayed through the sandbox's supervisor to the dockyard server,
which answers as this sandbox's owner. No network is needed.
"""

import os
import socket
import sys
import threading

SOCKET = "/run/dockyard/bridge.sock"
CHUNK = 65536


def upstream(conn):
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


def main():
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(SOCKET)
    except OSError as exc:
        sys.stderr.write(f"dockyard-bridge: cannot reach the sandbox supervisor at {SOCKET}: {exc.strerror}\n")
        return 1
    threading.Thread(target=upstream, args=(conn,), daemon=True).start()
    while True:
        data = conn.recv(CHUNK)
        if not data:
            return 0
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]


if __name__ == "__main__":
    sys.exit(main())
