"""Qwen-Image-Layered over HTTP: an RGBA upload (its alpha kept) is split into ``layers`` transparent images, one
data entry (or chat image part) per layer, in ``RequestOutput.images``' order; its fields and formats are checked
before it runs."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server.thread import ServerThread
from ditserve.testing import tiny_pipeline_dir

STEPS = {"prompt": "a red cat", "num_inference_steps": "2", "seed": "4"}


def rgba_png(seed: int = 0) -> tuple[Image.Image, bytes]:
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 64, 4), dtype=np.uint8), "RGBA")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return image, buffer.getvalue()


@pytest.fixture(scope="module")
def layered_engine() -> Iterator[DiffusionEngine]:
    from tests.entrypoints.server.conftest import make_engine

    # the layers are about 640x640 pixels (the pipeline's smallest resolution)
    engine = make_engine(tiny_pipeline_dir("qwen_image_layered"),
                         limits={"max_steps": 10, "max_image_size": 1024, "max_n": 2, "max_frames": 1})
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def layered_server(layered_engine: DiffusionEngine, serve: Callable[..., ServerThread],
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    server = serve(layered_engine, tmp_path_factory.mktemp("layered-server"))
    yield server
    server.stop()


def edit(server: ServerThread, fields: dict, image: bytes | None = None) -> httpx.Response:
    parts = [(name, (None, str(value))) for name, value in fields.items()]
    parts += [("image", ("in.png", image if image is not None else rgba_png()[1], "image/png"))]
    return httpx.post(f"{server.url}/v1/images/edits", files=parts, timeout=120)


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def assert_400(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, (response.status_code, response.text[:300])
    assert response.json()["error"]["param"] == param


def test_each_layer_is_one_transparent_data_entry_in_order(layered_server: ServerThread,
                                                            layered_engine: DiffusionEngine) -> None:
    source, data = rgba_png(1)
    response = edit(layered_server, {**STEPS, "layers": 2, "resolution": 640, "background": "transparent"}, data)
    assert response.status_code == 200, response.text[:300]
    body = response.json()
    layers = [decoded(entry["b64_json"]) for entry in body["data"]]
    assert len(layers) == 2 and body["size"] == "736x544"
    # the same request offline, from the RGBA original: the upload kept its alpha, and the entries are the layers
    # in RequestOutput.images' order
    params = OmniDiffusionSamplingParams(num_inference_steps=2, seed=4, layers=2, resolution=640)
    offline = layered_engine.generate([layered_engine.make_request("a red cat", params, images=[source])])[0]
    for served, made in zip(layers, offline.images, strict=True):
        assert served.mode == "RGBA"
        assert np.array_equal(np.asarray(served), np.asarray(made))
    assert not np.array_equal(np.asarray(layers[0]), np.asarray(layers[1]))


def test_n_outputs_give_n_times_layers_entries(layered_server: ServerThread) -> None:
    response = edit(layered_server, {**STEPS, "layers": 1, "n": 2, "output_format": "webp"})
    assert response.status_code == 200, response.text[:300]
    entries = response.json()["data"]
    assert len(entries) == 2 and all(decoded(e["b64_json"]).mode == "RGBA" for e in entries)


def test_chat_answers_one_image_part_per_layer(layered_server: ServerThread) -> None:
    url = "data:image/png;base64," + base64.b64encode(rgba_png(2)[1]).decode("ascii")
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a red cat"},
                                                      {"type": "image_url", "image_url": {"url": url}}]}],
            "num_inference_steps": 2, "seed": 1, "extra_body": {"layers": 3}}
    response = httpx.post(f"{layered_server.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text[:300]
    parts = response.json()["choices"][0]["message"]["content"]
    assert len(parts) == 3
    assert decoded(parts[0]["image_url"]["url"].split(",", 1)[1]).mode == "RGBA"


@pytest.mark.parametrize("fields, param", [
    ({"layers": 0}, "layers"),
    ({"layers": 17}, "layers"),
    ({"resolution": 512}, "resolution"),
    ({"output_format": "jpeg"}, "output_format"),
    ({"background": "opaque"}, "background"),
    ({"response_format": "file", "layers": 2}, "response_format"),
    ({"size": "640x480"}, "height"),
])
def test_fields_it_cannot_honour_are_a_400_naming_them(layered_server: ServerThread, fields: dict,
                                                       param: str) -> None:
    assert_400(edit(layered_server, {**STEPS, **fields}), param)


def test_one_layer_as_a_file(layered_server: ServerThread) -> None:
    response = edit(layered_server, {**STEPS, "layers": 1, "response_format": "file"})
    assert response.status_code == 200, response.text[:300]
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).mode == "RGBA"
