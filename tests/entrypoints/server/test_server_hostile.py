"""Hostile and malformed input: always a 4xx in OpenAI's error shape, never a 5xx or a 2xx, and the server
keeps answering afterwards."""

from __future__ import annotations

import json
import socket
import struct
import zlib
from collections.abc import Callable

import httpx
import pytest

from ditserve.entrypoints.server.thread import ServerThread

GENERATIONS = "/v1/images/generations"
VALID = {"prompt": "a dot", "size": "64x64", "num_inference_steps": 1}

BAD_JSON_BODIES = [
    {"prompt": 123},
    {"prompt": "x", "n": "two"},
    {"prompt": "x", "n": "2"},
    {"prompt": "x", "n": 0},
    {"prompt": "x", "n": 10**6},
    {"prompt": "x", "n": 1.5},
    {"prompt": "x", "seed": -1},
    {"prompt": "x", "seed": 2**80},
    {"prompt": "x", "num_inference_steps": 10**9},
    {"prompt": "x", "num_inference_steps": True},
    {"prompt": "x", "size": "99999x99999"},
    {"prompt": "x", "size": "64x64; rm -rf /"},
    {"prompt": "x", "size": 64},
    {"prompt": "x", "size": "0x64"},
    {"prompt": "x", "size": "63x64"},
    {"prompt": "x", "guidance_scale": -1},
    {"prompt": "x", "response_format": "url"},
    {"prompt": "x", "output_format": "bmp"},
    {"prompt": "x", "quality": "hd"},
    {"prompt": "x", "model": "dall-e-3"},
    {"prompt": "x" * 5000},
    {"prompt": None},
    {},
]
RAW_BODIES = [b"", b"not json", b"[1, 2]", b'{"prompt": "x", "guidance_scale": NaN}',
              b'{"prompt": "x", "true_cfg_scale": Infinity}', b"[" * 100_000, b'{"prompt": "\xff\xfe"}']
TRAVERSAL_IDS = ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "video_../../x", "video_" + "0" * 31 + "/",
                 "video_%00", "video_" + "g" * 32, "a" * 5000]


def assert_client_error(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text


@pytest.mark.parametrize("body", BAD_JSON_BODIES, ids=lambda b: json.dumps(b)[:40])
def test_invalid_json_fields_are_400(image_server: ServerThread, body: dict) -> None:
    response = httpx.post(image_server.url + GENERATIONS, json=body, timeout=30)
    assert_client_error(response)


def test_error_names_the_field(image_server: ServerThread) -> None:
    response = httpx.post(image_server.url + GENERATIONS, json={**VALID, "num_inference_steps": 10**9})
    assert response.status_code == 400 and response.json()["error"]["param"] == "num_inference_steps"
    response = httpx.post(image_server.url + GENERATIONS, json={**VALID, "colour": "red"})
    assert response.json()["error"]["param"] == "colour"


@pytest.mark.parametrize("route", [GENERATIONS, "/v1/videos"])
@pytest.mark.parametrize("raw", RAW_BODIES, ids=lambda r: repr(r[:20]))
def test_malformed_bodies_are_400(image_server: ServerThread, raw: bytes, route: str) -> None:
    response = httpx.post(image_server.url + route, content=raw, headers={"content-type": "application/json"},
                          timeout=30)
    assert_client_error(response)


def test_oversized_body_is_refused_before_it_is_read(image_server: ServerThread) -> None:
    declared = 50 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", image_server.port), timeout=10) as sock:
        # announce 50 MB but send none of it: the answer must come without the server waiting for the body
        sock.sendall(f"POST {GENERATIONS} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {declared}\r\n\r\n".encode())
        head = sock.recv(4096).decode("latin-1")
    assert head.startswith("HTTP/1.1 413")


def test_oversized_chunked_body_is_413(image_server: ServerThread) -> None:
    def chunks():
        for _ in range(50):  # 50 MB in 1 MB pieces, no Content-Length
            yield b" " * (1024 * 1024)

    response = httpx.post(image_server.url + GENERATIONS, content=chunks(),
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == 413


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image (a decompression bomb's calling card)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"\x00\x00\x00\x00IEND\xaeB`\x82"


@pytest.mark.parametrize("upload", [b"", b"GIF89a....", _png_claiming(100_000, 100_000), b"\x89PNG\r\n\x1a\n"],
                         ids=["empty", "gif", "bomb", "truncated"])
def test_bad_uploads_are_400(edit_server: ServerThread, upload: bytes) -> None:
    response = httpx.post(edit_server.url + "/v1/images/edits", data={"prompt": "x"},
                          files={"image": ("in.png", upload, "image/png")}, timeout=30)
    assert_client_error(response)
    assert response.json()["error"]["param"] == "image"


def test_edit_form_mistakes_are_4xx(image_server: ServerThread, png: Callable[..., bytes]) -> None:
    url = image_server.url + "/v1/images/edits"
    cases = [
        httpx.post(url, json={"prompt": "x"}),  # not multipart
        httpx.post(url, data={"prompt": "x", "image": "text, not a file"}),
        httpx.post(url, data={"prompt": "x", "n": "lots"}, files={"image": ("a.png", png(), "image/png")}),
        httpx.post(url, data={"prompt": "x"}, files={"other": ("a.png", png(), "image/png")}),
    ]
    for response in cases:
        assert_client_error(response)


@pytest.mark.parametrize("video_id", TRAVERSAL_IDS)
def test_traversal_and_malformed_video_ids_are_4xx(image_server: ServerThread, video_id: str) -> None:
    for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        response = httpx.request(method, f"{image_server.url}/v1/videos/{video_id}{suffix}")
        assert 400 <= response.status_code < 500, (method, video_id, response.status_code)
    assert_client_error(httpx.get(f"{image_server.url}/v1/videos", params={"after": "../x"}))
    assert_client_error(httpx.get(f"{image_server.url}/v1/videos", params={"limit": "NaN"}))


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Bearer", "bearer sk-ditserve-test", "Basic eA==",
                                    "Bearer sk-ditserve-test\u00e9"])
def test_bad_or_missing_auth_is_401(secured_server: ServerThread, header: str | None) -> None:
    headers = {} if header is None else {"authorization": header.encode("utf-8")}
    for method, path in (("GET", "/v1/models"), ("POST", GENERATIONS), ("GET", "/v1/videos")):
        response = httpx.request(method, secured_server.url + path, headers=headers, json=VALID)
        assert response.status_code == 401, (method, path, response.status_code)
        assert response.json()["error"]["type"] == "authentication_error"


def test_server_still_answers_after_abuse(image_server: ServerThread) -> None:
    assert httpx.get(image_server.url + "/health").json()["status"] == "ok"
    response = httpx.post(image_server.url + GENERATIONS, json=VALID, timeout=60)
    assert response.status_code == 200 and response.json()["data"][0]["b64_json"]
    metrics = httpx.get(image_server.url + "/metrics").text
    assert 'status="500"' not in metrics


def test_made_up_methods_and_paths_do_not_grow_the_metric_labels(image_server: ServerThread) -> None:
    for index in range(40):
        httpx.request(f"MADEUP{index}", image_server.url + "/v1/models")
        httpx.get(f"{image_server.url}/no/such/path/{index}")
    metrics = httpx.get(image_server.url + "/metrics").text
    assert "MADEUP" not in metrics and "/no/such/path" not in metrics
    assert 'method="other",route="/v1/models"' in metrics
    assert 'method="GET",route="other",status="404"' in metrics
    series = [line for line in metrics.splitlines() if line.startswith("ditserve_http_requests_total{")]
    assert len(series) < 40
