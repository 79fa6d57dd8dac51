"""Slow clients cannot hold connections: a request head must arrive within the header timeout (the
connection is closed), a body within the body timeout (408 in OpenAI's shape); flags carry the limits."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator

import httpx
import pytest

from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.cli import build_parser
from ditserve.entrypoints.server import cli as serve_cli
from ditserve.entrypoints.server.connections import ConnectionLimits
from ditserve.entrypoints.server.thread import ServerThread

#: how long the test client waits for the server to act: far beyond the short timeouts set below
PATIENCE_S = 20


@pytest.fixture(scope="module")
def impatient_server(image_engine: DiffusionEngine, tmp_path_factory: pytest.TempPathFactory,
                     serve: Callable[..., ServerThread]) -> Iterator[ServerThread]:
    server = serve(image_engine, tmp_path_factory.mktemp("impatient"),
                   connections=ConnectionLimits(header_timeout_s=0.3, body_timeout_s=0.3))
    yield server
    server.stop()


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(PATIENCE_S)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize("sent", [b"", b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaa"],
                         ids=["silent", "trickled-head"])
def test_a_connection_without_a_complete_head_is_closed(impatient_server: ServerThread, sent: bytes) -> None:
    with socket.create_connection(("127.0.0.1", impatient_server.port), timeout=PATIENCE_S) as sock:
        sock.sendall(sent)
        # closed by the server, with nothing sent: recv returns b"" instead of waiting PATIENCE_S
        assert read_all(sock) == b""


def test_a_keep_alive_connection_gets_a_new_head_deadline(impatient_server: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", impatient_server.port), timeout=PATIENCE_S) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /health HTTP/1.1\r\nHost: 127")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1


def test_a_slow_body_is_408(impatient_server: ServerThread) -> None:
    with socket.create_connection(("127.0.0.1", impatient_server.port), timeout=PATIENCE_S) as sock:
        sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\": ")
        answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert "--body-timeout" in error["message"] and error["type"] == "invalid_request_error"


def test_requests_in_time_still_work(impatient_server: ServerThread) -> None:
    assert httpx.get(impatient_server.url + "/v1/models").status_code == 200


def test_flags_set_the_connection_limits() -> None:
    args = build_parser().parse_args(["serve", "--header-timeout", "3", "--body-timeout", "40",
                                      "--timeout-keep-alive", "2", "--limit-concurrency", "10"])
    assert serve_cli.server_settings(args).connections == ConnectionLimits(3.0, 40.0, 2, 10)
    defaults = serve_cli.server_settings(build_parser().parse_args(["serve"])).connections
    assert defaults == ConnectionLimits()
