"""Browser safety: a page cannot drive a local server. A Host that is not this server's (DNS rebinding) is
refused, and so is a request from another origin unless ``--allowed-origins`` lists it, including the
"simple" multipart POST browsers send cross-origin without a preflight."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server import ServerSettings
from ditserve.entrypoints.server.security import allowed_host_patterns, host_allowed, host_name
from ditserve.entrypoints.server.thread import ServerThread
from ditserve.errors import InvalidParameterError

APP_ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def open_server(image_engine: DiffusionEngine, tmp_path_factory: pytest.TempPathFactory,
                serve: Callable[..., ServerThread]) -> Iterator[ServerThread]:
    server = serve(image_engine, tmp_path_factory.mktemp("browser"), allowed_hosts=["ditserve.internal"],
                   allowed_origins=[APP_ORIGIN])
    yield server
    server.stop()


def assert_openai_error(response: httpx.Response, status: int, param: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:200])
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


@pytest.mark.parametrize("host", ["attacker.example", "attacker.example:8000", "127.0.0.1.nip.io", "",
                                  "localhost.attacker.example"])
def test_a_foreign_host_is_refused_on_every_route(image_server: ServerThread, host: str) -> None:
    for method, path in (("GET", "/v1/videos"), ("GET", "/metrics"), ("GET", "/health"),
                         ("POST", "/v1/images/generations")):
        response = httpx.request(method, image_server.url + path, headers={"host": host}, json={"prompt": "x"})
        assert_openai_error(response, 400, "Host")


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:1234", "127.0.0.1", "[::1]:8000", "ditserve.internal:80"])
def test_loopback_names_and_allowed_hosts_pass(open_server: ServerThread, host: str) -> None:
    assert httpx.get(open_server.url + "/v1/models", headers={"host": host}).status_code == 200


def test_a_cross_origin_simple_multipart_post_is_refused_before_it_runs(
        video_server: ServerThread, png: Callable[..., bytes]) -> None:
    before = len(httpx.get(video_server.url + "/v1/videos", params={"limit": 100}).json()["data"])
    for origin in ("https://evil.example", "null", "http://localhost:9999"):
        response = httpx.post(video_server.url + "/v1/videos", headers={"origin": origin},
                              data={"prompt": "queued by a web page", "size": "32x32"})
        assert_openai_error(response, 403, "Origin")
        assert "access-control-allow-origin" not in response.headers
        response = httpx.get(video_server.url + "/v1/videos", headers={"origin": origin})
        assert_openai_error(response, 403, "Origin")
    assert len(httpx.get(video_server.url + "/v1/videos", params={"limit": 100}).json()["data"]) == before


def test_an_allowed_origin_gets_cors_answers_and_same_origin_pages_work(open_server: ServerThread) -> None:
    preflight = httpx.options(open_server.url + "/v1/images/generations", headers={
        "origin": APP_ORIGIN, "access-control-request-method": "POST",
        "access-control-request-headers": "content-type, authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == APP_ORIGIN
    response = httpx.get(open_server.url + "/v1/models", headers={"origin": APP_ORIGIN})
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == APP_ORIGIN
    # the server's own pages (/docs) send their own origin
    assert httpx.get(open_server.url + "/v1/models", headers={"origin": open_server.url}).status_code == 200
    refused = httpx.options(open_server.url + "/v1/images/generations", headers={
        "origin": "https://evil.example", "access-control-request-method": "POST"})
    assert_openai_error(refused, 403, "Origin")


def test_host_names_and_origins_are_parsed_strictly(tmp_path: Path) -> None:
    assert [host_name(h) for h in ("Example.COM.:80", "[::1]:8000", "::1", "127.0.0.1")] == [
        "example.com", "::1", "::1", "127.0.0.1"]
    patterns = allowed_host_patterns("0.0.0.0", ["*.corp.example"])
    assert host_allowed("gpu1.corp.example", patterns) and not host_allowed("corp.example.evil", patterns)
    assert not host_allowed("0.0.0.0", patterns)  # a wildcard bind address is no name
    assert host_allowed("anything", allowed_host_patterns("127.0.0.1", ["*"]))
    with pytest.raises(InvalidParameterError) as error:
        ServerSettings(served_model_name="x", output_dir=tmp_path, allowed_origins=["app.example.com/path"])
    assert error.value.param == "allowed_origins"
