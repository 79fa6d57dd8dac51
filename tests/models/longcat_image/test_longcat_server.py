"""LongCat-Image-Edit over HTTP: ``/v1/images/edits`` (an uploaded file) and ``/v1/chat/completions`` (an
``image_url`` data URL) edit the input image as the offline engine does, at the size the server picks within its
``--max-image-size``."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ditserve.config import OmniDiffusionConfig, OmniDiffusionSamplingParams
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server.app import ServerSettings, create_app
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff

MAX_IMAGE_SIZE = 128
FIELDS = {"prompt": "turn this into a painting", "seed": 4, "num_inference_steps": 2}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


INPUT = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def engine() -> Iterator[DiffusionEngine]:
    engine = DiffusionEngine(OmniDiffusionConfig(model=tiny_pipeline_dir("longcat_image_edit"),
                                                 limits={"max_image_size": MAX_IMAGE_SIZE}))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(engine: DiffusionEngine, tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    app = create_app(engine, ServerSettings(served_model_name="longcat-edit",
                                            output_dir=tmp_path_factory.mktemp("longcat-server")))
    return TestClient(app, base_url="http://localhost")  # the Host a local client sends


@pytest.fixture(scope="module")
def uploaded(client: TestClient) -> Image.Image:
    response = client.post("/v1/images/edits", data={k: str(v) for k, v in FIELDS.items()},
                           files=[("image", ("in.png", png_bytes(INPUT), "image/png"))])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["seed"] == FIELDS["seed"]
    return decoded(body["data"][0]["b64_json"])


def test_edit_upload_equals_the_offline_engine_at_the_servers_size(uploaded: Image.Image,
                                                                   engine: DiffusionEngine) -> None:
    # the model's own size (about one megapixel) is over the limit: the server shrinks it, keeping the multiple
    assert max(uploaded.size) <= MAX_IMAGE_SIZE
    assert all(side % engine.adapter.size_multiple == 0 for side in uploaded.size)
    params = OmniDiffusionSamplingParams(seed=FIELDS["seed"], num_inference_steps=FIELDS["num_inference_steps"],
                                         width=uploaded.size[0], height=uploaded.size[1])
    offline = engine.generate([engine.make_request(FIELDS["prompt"], params, images=[INPUT])])[0]
    assert max_abs_diff(uploaded, offline.images[0]) == 0


def test_chat_image_url_equals_the_upload(client: TestClient, uploaded: Image.Image) -> None:
    url = "data:image/png;base64," + base64.b64encode(png_bytes(INPUT)).decode("ascii")
    content = [{"type": "text", "text": FIELDS["prompt"]}, {"type": "image_url", "image_url": {"url": url}}]
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": content}], "seed": FIELDS["seed"],
        "num_inference_steps": FIELDS["num_inference_steps"]})
    assert response.status_code == 200, response.text
    part = response.json()["choices"][0]["message"]["content"][0]
    image = decoded(part["image_url"]["url"].partition(",")[2])
    assert max_abs_diff(image, uploaded) == 0


def test_edit_without_an_image_is_a_400_naming_it(client: TestClient) -> None:
    # every field as a multipart part without a file name (a text field): a multipart body with no file
    response = client.post("/v1/images/edits", files=[(k, (None, str(v))) for k, v in FIELDS.items()])
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "image"
