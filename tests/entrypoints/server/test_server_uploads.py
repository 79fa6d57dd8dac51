"""Uploads are counted against what the model takes before any of them is decoded (16 requests of 16 PNGs each
used to be decoded, 4.7 GiB of memory, and only then refused), and decoding is bounded by a semaphore."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from ditserve.entrypoints.server import uploads
from ditserve.entrypoints.server.thread import ServerThread


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The fields of every upload the servers decode during the test (the servers run in this process)."""
    real = uploads.decode_image
    fields: list[str] = []

    def counting(data: bytes, field: str, max_side: int, mode: str):
        fields.append(field)
        return real(data, field, max_side, mode)

    monkeypatch.setattr(uploads, "decode_image", counting)
    yield fields


def _files(field: str, count: int, png: Callable[..., bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"{i}.png", png(16, 16, i), "image/png")) for i in range(count)]


def assert_400(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, (response.status_code, response.text[:300])
    assert response.json()["error"]["param"] == param


def test_text_to_image_server_refuses_edit_uploads_without_decoding(image_server: ServerThread,
                                                                    png: Callable[..., bytes],
                                                                    decodes: list[str]) -> None:
    response = httpx.post(image_server.url + "/v1/images/edits", data={"prompt": "x"},
                          files=_files("image", 16, png), timeout=30)
    assert_400(response, "model")
    assert response.json()["error"]["code"] == "unsupported_for_model"
    response = httpx.post(image_server.url + "/v1/videos", data={"prompt": "x"},
                          files=_files("input_reference", 16, png), timeout=30)
    assert_400(response, "model")
    assert decodes == []


def test_text_to_video_server_refuses_input_references_without_decoding(video_server: ServerThread,
                                                                        png: Callable[..., bytes],
                                                                        decodes: list[str]) -> None:
    response = httpx.post(video_server.url + "/v1/videos", data={"prompt": "x", "size": "32x32"},
                          files=_files("input_reference", 16, png), timeout=30)
    assert_400(response, "input_reference")
    assert "takes no input image" in response.json()["error"]["message"]
    assert decodes == []


def test_edit_server_refuses_more_images_than_the_model_takes_without_decoding(edit_server: ServerThread,
                                                                               png: Callable[..., bytes],
                                                                               decodes: list[str]) -> None:
    # the tiny Qwen-Image-Edit takes one input image
    response = httpx.post(edit_server.url + "/v1/images/edits", data={"prompt": "x"},
                          files=_files("image", 2, png), timeout=30)
    assert_400(response, "image")
    assert "at most 1" in response.json()["error"]["message"]
    # text over its limit is refused before the upload is decoded too
    response = httpx.post(edit_server.url + "/v1/images/edits", data={"prompt": "x", "negative_prompt": "y" * 4001},
                          files=_files("image", 1, png), timeout=30)
    assert_400(response, "negative_prompt")
    assert decodes == []
    # the counter does see decodes: a valid edit decodes its one image
    response = httpx.post(edit_server.url + "/v1/images/edits", data={"prompt": "x", "num_inference_steps": "1", "size": "32x32"},
                          files=_files("image", 1, png), timeout=60)
    assert response.status_code == 200, response.text
    assert decodes == ["image"]


def test_decode_permits_follow_the_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploads.os, "cpu_count", lambda: 64)
    # 2048x2048 at 7 bytes a pixel is 28 MiB: nine fit in 256 MiB
    assert uploads.decode_permits(2048) == 9
    assert uploads.decode_permits(8192) == 1  # one always, even when a single image is over the budget
    assert uploads.decode_permits(64) == 64  # small images: bounded by the cores
