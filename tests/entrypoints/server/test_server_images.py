"""Images and edits through the official ``openai`` client against a real uvicorn server."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import httpx
import openai
import pytest
from PIL import Image

from ditserve.entrypoints.server.thread import ServerThread

SMALL = {"size": "64x64", "extra_body": {"num_inference_steps": 2}}
Connect = Callable[..., openai.OpenAI]
Png = Callable[..., bytes]


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_generate_same_seed_same_bytes_and_reports_timings(image_server: ServerThread, connect: Connect) -> None:
    api = connect(image_server)

    def generate(seed: int) -> openai.types.ImagesResponse:
        return api.images.generate(model="tiny", prompt="a red square", response_format="b64_json", size="64x64",
                                   extra_body={"num_inference_steps": 2, "seed": seed})

    first, again, other = generate(7), generate(7), generate(8)
    assert first.data[0].b64_json == again.data[0].b64_json
    assert first.data[0].b64_json != other.data[0].b64_json
    assert decode(first.data[0].b64_json).size == (64, 64)
    extra = first.model_extra or {}
    assert extra["seed"] == 7
    assert extra["timings"]["total_s"] > 0 and extra["timings"]["denoise_s"] > 0
    assert "cache_stats" in extra and first.size == "64x64"


def test_generate_n_images_in_the_asked_format(image_server: ServerThread, connect: Connect) -> None:
    result = connect(image_server).images.generate(prompt="two blue dots", n=2, output_format="jpeg", **SMALL)
    assert len(result.data) == 2
    assert all(decode(item.b64_json).format == "JPEG" for item in result.data)
    assert result.data[0].b64_json != result.data[1].b64_json


def test_models_lists_the_served_model_with_kind_and_size(image_server: ServerThread, connect: Connect) -> None:
    models = connect(image_server).models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_extra["kind"] == "image"
    assert models[0].model_extra["default_size"].count("x") == 1


def test_edit_on_an_image_model_is_a_clear_400(image_server: ServerThread, connect: Connect, png: Png) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        connect(image_server).images.edit(image=("in.png", png(), "image/png"), prompt="make it red")
    error = raised.value.body
    assert error["param"] == "model" and "/v1/images/generations" in error["message"]


def test_edit_with_the_openai_client(edit_server: ServerThread, connect: Connect, png: Png) -> None:
    api = connect(edit_server)
    source = ("in.png", png(64, 64), "image/png")
    first = api.images.edit(image=source, prompt="make it red", **SMALL)
    again = api.images.edit(image=source, prompt="make it red", size="64x64",
                            extra_body={"num_inference_steps": 2, "seed": first.model_extra["seed"]})
    assert decode(first.data[0].b64_json).size == (64, 64)
    assert first.data[0].b64_json == again.data[0].b64_json


def test_edit_refuses_a_mask_it_cannot_use(edit_server: ServerThread, connect: Connect, png: Png) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        connect(edit_server).images.edit(image=("in.png", png(), "image/png"),
                                         mask=("m.png", png(), "image/png"), prompt="x", **SMALL)
    assert raised.value.body["param"] == "mask"


def test_api_key_is_required_on_v1_only(secured_server: ServerThread, connect: Connect, api_key: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        connect(secured_server, api_key="sk-wrong").models.list()
    no_header = httpx.get(f"{secured_server.url}/v1/models")
    assert no_header.status_code == 401 and no_header.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{secured_server.url}/health").status_code == 200
    assert connect(secured_server, api_key=api_key).models.list().data[0].id == "tiny"


def test_metrics_count_requests_batches_and_queue(image_server: ServerThread, connect: Connect) -> None:
    connect(image_server).images.generate(prompt="metrics", **SMALL)
    text = httpx.get(f"{image_server.url}/metrics").text
    assert 'ditserve_http_requests_total{method="POST",route="/v1/images/generations",status="200"}' in text
    assert "ditserve_queue_depth 0.0" in text
    assert "ditserve_batch_size_count" in text and "ditserve_step_latency_seconds_bucket" in text
