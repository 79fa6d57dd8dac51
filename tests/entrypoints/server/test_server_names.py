"""Model aliases (``--served-model-name NAME [NAME ...]``, the hub id of a hub-cache folder) and request ids
(``X-Request-Id``: echoed, or made here; the engine's id of the request)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.cli import build_parser
from ditserve.entrypoints.server import cli as serve_cli
from ditserve.entrypoints.server.request_ids import REQUEST_ID_PATTERN
from ditserve.entrypoints.server.thread import ServerThread

SMALL = {"prompt": "a dot", "size": "16x16", "num_inference_steps": 1}


@pytest.fixture(scope="module")
def aliased_server(image_engine: DiffusionEngine, tmp_path_factory: pytest.TempPathFactory,
                   serve: Callable[..., ServerThread]) -> Iterator[ServerThread]:
    server = serve(image_engine, tmp_path_factory.mktemp("aliases"), served_model_name="tiny-flux",
                   aliases=["org/tiny-flux", "tiny"])
    yield server
    server.stop()


def test_every_alias_is_listed_and_accepted(aliased_server: ServerThread,
                                            connect: Callable[..., openai.OpenAI]) -> None:
    api = connect(aliased_server)
    assert [m.id for m in api.models.list().data] == ["tiny-flux", "org/tiny-flux", "tiny"]
    for name in ("tiny-flux", "org/tiny-flux", "tiny"):
        assert api.images.generate(model=name, prompt="x", size="16x16", extra_body={"num_inference_steps": 1}).data
    with pytest.raises(openai.NotFoundError) as raised:
        api.images.generate(model="Qwen/Qwen-Image", prompt="x")
    assert "org/tiny-flux" in raised.value.body["message"]


def parse(*argv: str) -> Any:
    return build_parser().parse_args(["serve", *argv])


def test_cli_names_flags_and_defaults(tmp_path: Path) -> None:
    settings = serve_cli.server_settings(parse("--served-model-name", "a", "org/a", "a", "--allow-remote-images"))
    assert (settings.served_model_name, settings.aliases, settings.allow_remote_images) == ("a", ["org/a"], True)
    snapshot = tmp_path / "models--Org--Some-Model" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    assert serve_cli.served_model_names(parse(str(snapshot))) == ["Org/Some-Model", "Some-Model"]
    assert serve_cli.served_model_names(parse("Qwen/Qwen-Image")) == ["Qwen-Image", "Qwen/Qwen-Image"]
    assert serve_cli.served_model_names(parse(str(tmp_path))) == [tmp_path.name]
    assert serve_cli.engine_config(parse()).limits.max_n == 10
    assert not serve_cli.server_settings(parse()).allow_remote_images


def test_request_id_is_echoed_or_made(image_server: ServerThread) -> None:
    url = f"{image_server.url}/v1/images/generations"
    given = httpx.post(url, json=SMALL, headers={"X-Request-Id": "client-42"}, timeout=60)
    assert given.status_code == 200 and given.headers["x-request-id"] == "client-42"
    made = httpx.post(url, json=SMALL, timeout=60).headers["x-request-id"]
    assert REQUEST_ID_PATTERN.fullmatch(made) and made != "client-42"
    # errors carry it too, and a malformed one is refused naming the header
    assert httpx.get(f"{image_server.url}/v1/videos/nope", headers={"X-Request-Id": "e-1"}).headers[
        "x-request-id"] == "e-1"
    bad = httpx.post(url, json=SMALL, headers={"X-Request-Id": "has space"}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"


def test_request_id_is_the_engine_id_and_names_one_request_at_a_time(image_server: ServerThread) -> None:
    state = image_server.app.state.server
    url = f"{image_server.url}/v1/images/generations"
    slow = {**SMALL, "num_inference_steps": 400}
    answers: list[httpx.Response] = []
    first = threading.Thread(target=lambda: answers.append(
        httpx.post(url, json=slow, headers={"X-Request-Id": "same-id"}, timeout=120)))
    first.start()
    while "same-id" not in state.in_flight and first.is_alive():  # waits for a state, not for a time
        first.join(0.01)
    assert "same-id" in state.engine._active
    second = httpx.post(url, json=SMALL, headers={"X-Request-Id": "same-id"}, timeout=60)
    assert second.status_code == 409 and second.json()["error"]["code"] == "duplicate_request_id"
    # the id names the first request in the engine: aborting it there ends the first client's request
    assert state.engine.abort("same-id")
    first.join()
    assert answers[0].status_code == 409 and answers[0].json()["error"]["code"] == "request_aborted"
    # once it has left, the id is free again
    third = httpx.post(url, json=SMALL, headers={"X-Request-Id": "same-id"}, timeout=60)
    assert third.status_code == 200
