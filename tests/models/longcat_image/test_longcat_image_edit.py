"""LongCat-Image-Edit parity: ditserve's shared loop equals diffusers' own LongCatImageEditPipeline on the same
weights, prompt, input image and seed.

diffusers makes about one megapixel whatever the input, and the VAE's work at that size is the slow part on a
CPU, so the runs at the model's own size are few: the reference, the same request through Omni, a batch of two
requests with different prompts, seeds, guidance and images (of one size), and the second request alone. A
request with its own small size checks the resizing cheaply.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import LongCatImageEditPipeline
from PIL import Image

from ditserve import Omni
from ditserve.errors import InvalidParameterError
from ditserve.models.longcat_image.edit import LongCatImageEditAdapter
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff

STEPS = {"num_inference_steps": 2}
PROMPT_A = {"prompt": "turn this into a painting"}
PROMPT_B = {"prompt": "a small green circle at the top left", "negative_prompt": "blue"}


def random_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


IMAGE_A, IMAGE_B = random_image(0), random_image(1)


def edit_request(prompt: dict, image: Image.Image) -> dict:
    return {**prompt, "multi_modal_data": {"image": image}}


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, Any]]:
    folder = tiny_pipeline_dir("longcat_image_edit")
    pipe = LongCatImageEditPipeline.from_pretrained(folder, **LongCatImageEditAdapter.preloaded_components(folder))
    pipe.set_progress_bar_config(disable=True)
    omni = Omni(model=folder, max_batch_size=4)
    try:
        reference = pipe(image=IMAGE_A, **PROMPT_A, generator=torch.Generator("cpu").manual_seed(0), **STEPS)
        yield {"omni": omni, "reference": reference.images[0],
               "solo_a": omni.generate(edit_request(PROMPT_A, IMAGE_A), seed=0, **STEPS)[0],
               "solo_b": omni.generate(edit_request(PROMPT_B, IMAGE_B), seed=5, guidance_scale=3.0, **STEPS)[0],
               "batch": omni.generate([edit_request(PROMPT_A, IMAGE_A), edit_request(PROMPT_B, IMAGE_B)],
                                      [{"seed": 0, **STEPS}, {"seed": 5, "guidance_scale": 3.0, **STEPS}])}
    finally:
        omni.close()


def test_matches_diffusers(runs: dict[str, Any]) -> None:
    assert max_abs_diff(runs["solo_a"].images[0], runs["reference"]) <= 3


def test_parity_oracle_detects_a_different_request(runs: dict[str, Any]) -> None:
    assert max_abs_diff(runs["solo_b"].images[0], runs["reference"]) > 10


def test_batch_with_different_prompts_seeds_guidance_and_images_equals_solo(runs: dict[str, Any]) -> None:
    batch = runs["batch"]
    assert [o.timings["batch_size"] for o in batch] == [2, 2]
    assert max_abs_diff(batch[0].images[0], runs["solo_a"].images[0]) <= 1
    assert max_abs_diff(batch[1].images[0], runs["solo_b"].images[0]) <= 1


def test_default_output_size_is_the_models_and_is_reported(runs: dict[str, Any]) -> None:
    output = runs["solo_a"]
    assert output.images[0].size == runs["reference"].size
    assert (output.params.width, output.params.height) == runs["reference"].size


def test_a_size_of_the_requests_own_resizes_the_input_image(runs: dict[str, Any]) -> None:
    omni = runs["omni"]
    multiple = omni.engine.adapter.size_multiple
    size = {"height": multiple, "width": 2 * multiple}
    small = omni.generate(edit_request(PROMPT_A, IMAGE_A), seed=0, **size, **STEPS)[0]
    assert small.images[0].size == (2 * multiple, multiple)
    # the input image conditions the output at that size too
    other_image = omni.generate(edit_request(PROMPT_A, IMAGE_B), seed=0, **size, **STEPS)[0]
    assert max_abs_diff(small.images[0], other_image.images[0]) > 10


def test_embedding_depends_on_the_image_so_is_never_cached(runs: dict[str, Any]) -> None:
    engine = runs["omni"].engine
    assert engine.adapter.prompt_cache_key(engine.make_request(PROMPT_A["prompt"], images=[IMAGE_A])) is None


@pytest.mark.parametrize(("request_fields", "field"), [
    ({"prompt": "x"}, "image"),
    (edit_request({"prompt": "x"}, [IMAGE_A, IMAGE_B]), "image"),
    (edit_request({"prompt": "x", "negative_prompt": "blue"}, IMAGE_A), "negative_prompt"),
])
def test_bad_requests_raise_naming_the_field(runs: dict[str, Any], request_fields: dict, field: str) -> None:
    with pytest.raises(InvalidParameterError) as error:
        runs["omni"].generate(request_fields, guidance_scale=1.0, **STEPS)
    assert error.value.param == field
