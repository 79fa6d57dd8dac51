"""Slowloris check of issue 18: open 400 connections that trickle a request head (one header byte a second),
and count how many the server still holds after its header timeout, with the default ConnectionLimits.
Before the fix all 400 stayed open indefinitely. Not a test: it waits for the real timeout (15 s).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/slow_clients.py
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path

import httpx

from ditserve.config import OmniDiffusionConfig
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server import ServerSettings, create_app
from ditserve.entrypoints.server.connections import ConnectionLimits
from ditserve.entrypoints.server.thread import ServerThread
from ditserve.testing import tiny_pipeline_dir

CONNECTIONS = 400


def still_open(sock: socket.socket) -> bool:
    try:
        sock.send(b"a")  # one more trickled byte; a closed peer answers with a reset
        sock.setblocking(False)
        return sock.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def main() -> None:
    limits = ConnectionLimits()
    with tempfile.TemporaryDirectory() as folder:
        engine = DiffusionEngine(OmniDiffusionConfig(model=tiny_pipeline_dir("flux")))
        server = ServerThread(create_app(engine, ServerSettings(served_model_name="tiny", output_dir=Path(folder))))
        sockets = []
        for _ in range(CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            sockets.append(sock)
        started = time.monotonic()
        counts = {}
        for wait_s in (limits.header_timeout_s / 2, limits.header_timeout_s + 3):
            while time.monotonic() - started < wait_s:
                for sock in sockets:
                    still_open(sock)
                time.sleep(1)
            counts[f"open after {wait_s:g} s"] = sum(still_open(sock) for sock in sockets)
        counts["a normal request afterwards"] = httpx.get(server.url + "/v1/models", timeout=10).status_code
        for sock in sockets:
            sock.close()
        server.stop()
        engine.close()
    print(json.dumps({"connections": CONNECTIONS, "header_timeout_s": limits.header_timeout_s, **counts}, indent=1))


if __name__ == "__main__":
    main()
