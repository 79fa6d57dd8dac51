"""Text fields are checked on their own before any work: length limits (negative_prompt too) and UTF-8
encodability (a lone surrogate used to fail the whole batch in the tokenizer, and a video job at the SQLite
insert) are a 400 naming the field, on every generating route, JSON and multipart."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from ditserve.config import MAX_TEXT_CHARS
from ditserve.entrypoints.server.thread import ServerThread

LONE_SURROGATE = "\ud800"
VALID_IMAGE = {"prompt": "a dot", "size": "64x64", "num_inference_steps": 1}
VALID_VIDEO = {"prompt": "a ball", "size": "32x32", "num_frames": 5, "num_inference_steps": 1}
BOUNDARY = "ditserve-test-boundary"


def post_json(url: str, body: dict) -> httpx.Response:
    # json.dumps escapes the surrogate as \ud800, which is valid JSON; the server's parser turns it back
    return httpx.post(url, content=json.dumps(body).encode(), headers={"content-type": "application/json"},
                      timeout=60)


def post_utf7_form(url: str, fields: dict[str, str], files: dict[str, bytes]) -> httpx.Response:
    """A multipart form declared as UTF-7: the one way a form field can carry a lone surrogate ("+2AA-")."""
    parts = [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() +
             value.encode("utf-7") + b"\r\n" for name, value in fields.items()]
    parts += [f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="in.png"\r\n'
              "Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for name, data in files.items()]
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    return httpx.post(url, content=body, timeout=60,
                      headers={"content-type": f"multipart/form-data; boundary={BOUNDARY}; charset=utf-7"})


def assert_refused(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert error["param"] == param, error
    assert "Traceback" not in response.text


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_lone_surrogate_in_image_generation_is_400(image_server: ServerThread, field: str) -> None:
    response = post_json(image_server.url + "/v1/images/generations",
                         {**VALID_IMAGE, field: f"a {LONE_SURROGATE} dot"})
    # FastAPI's JSON model refuses it already (pydantic: "unable to parse raw data as a unicode string")
    assert_refused(response, field)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_lone_surrogate_in_video_job_is_400_and_leaves_no_job(video_server: ServerThread, field: str) -> None:
    before = httpx.get(video_server.url + "/v1/videos", params={"limit": 100}).json()["data"]
    assert_refused(post_json(video_server.url + "/v1/videos", {**VALID_VIDEO, field: LONE_SURROGATE}), field)
    assert_refused(post_utf7_form(video_server.url + "/v1/videos",
                                  {"prompt": "a ball", "size": "32x32", field: LONE_SURROGATE}, {}), field)
    after = httpx.get(video_server.url + "/v1/videos", params={"limit": 100}).json()["data"]
    assert len(after) == len(before)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_lone_surrogate_in_an_edit_form_is_400(edit_server: ServerThread, png: Callable[..., bytes],
                                               field: str) -> None:
    fields = {"prompt": "make it red", field: f"x{LONE_SURROGATE}"}
    assert_refused(post_utf7_form(edit_server.url + "/v1/images/edits", fields, {"image": png()}), field)


def test_utf7_form_without_surrogates_is_read_as_text(video_server: ServerThread) -> None:
    # the charset is honoured, not refused: only what cannot be encoded as UTF-8 is
    response = post_utf7_form(video_server.url + "/v1/videos",
                              {"prompt": "a ball", "size": "32x32", "num_frames": "5",
                               "num_inference_steps": "1"}, {})
    assert response.status_code == 200, response.text
    assert response.json()["prompt"] == "a ball"


@pytest.mark.parametrize("route, body", [("/v1/images/generations", VALID_IMAGE), ("/v1/videos", VALID_VIDEO)])
def test_negative_prompt_has_a_length_limit(image_server: ServerThread, video_server: ServerThread, route: str,
                                            body: dict) -> None:
    server = image_server if route.endswith("generations") else video_server
    # over the engine's limit (4000 by default): refused before any tokenizing
    assert_refused(post_json(server.url + route, {**body, "negative_prompt": "x" * 4001}), "negative_prompt")
    # over the hard ceiling of the HTTP models: refused by validation, before the engine is asked
    assert_refused(post_json(server.url + route, {**body, "negative_prompt": "x" * (MAX_TEXT_CHARS + 1)}),
                   "negative_prompt")
    assert_refused(post_json(server.url + route, {**body, "prompt": "x" * (MAX_TEXT_CHARS + 1)}), "prompt")


def test_a_valid_request_still_works_after_the_refusals(image_server: ServerThread) -> None:
    response = post_json(image_server.url + "/v1/images/generations", {**VALID_IMAGE, "negative_prompt": "blur"})
    assert response.status_code == 200, response.text
