"""The bundled edit model is served by its name with no download, and answers an edit of its own language."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from ditserve.demo import DEMO_EDIT_MODEL_NAME
from ditserve.demo.edit_evaluation import source_images
from ditserve.demo.edit_language import heldout_edits
from ditserve.entrypoints.server.thread import ServerThread
from ditserve.models.loader import resolve_model_path
from tests.entrypoints.server.conftest import make_engine, start


@pytest.fixture(scope="module")
def edit_demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    engine = make_engine(DEMO_EDIT_MODEL_NAME, limits={"max_steps": 50, "max_image_size": 128, "max_n": 2})
    server = start(engine, tmp_path_factory.mktemp("edit-demo"), served_model_name=DEMO_EDIT_MODEL_NAME)
    yield server
    server.stop()
    engine.close()


def test_the_bundled_edit_model_answers_an_edit_by_name(edit_demo_server: ServerThread,
                                                       connect: Callable[..., openai.OpenAI]) -> None:
    edit = heldout_edits(1)[0]
    picture = io.BytesIO()
    source_images([edit])[0].save(picture, format="PNG")
    client = connect(edit_demo_server)
    assert [m.id for m in client.models.list().data] == [DEMO_EDIT_MODEL_NAME]
    answer = client.images.edit(model=DEMO_EDIT_MODEL_NAME, image=("in.png", picture.getvalue(), "image/png"),
                                prompt=edit.instruction, extra_body={"num_inference_steps": 3, "seed": 0})
    edited = Image.open(io.BytesIO(base64.b64decode(answer.data[0].b64_json)))
    assert edited.size == (128, 128)  # the model's own size, from its ditserve_defaults.json (max_area 128x128)
    # even at 3 steps the answer follows the input picture (its background dominates), not noise
    source = np.asarray(source_images([edit])[0]).astype(float)
    assert np.abs(np.asarray(edited.convert("RGB")).astype(float) - source).mean() < 40


def test_bundled_names_resolve_to_their_folders() -> None:
    assert Path(resolve_model_path(DEMO_EDIT_MODEL_NAME)).name == DEMO_EDIT_MODEL_NAME
    assert resolve_model_path(None).endswith("ditserve-shapes")
