"""Qwen-Image-Edit and Qwen-Image-Edit-2509 parity: ditserve's shared loop equals diffusers' own
QwenImageEditPipeline / QwenImageEditPlusPipeline on the same weights, prompt, input images and seed.

Each run VAE-encodes every input image at about 1024x1024 pixels (diffusers' fixed area), the slow part on a CPU,
so each family makes few runs: the reference, the same request through Omni, a batch of two requests with
different prompts, seeds and images, and the second request alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ditserve import Omni
from ditserve.errors import InvalidParameterError
from ditserve.models.qwen_image.edit import QwenImageEditAdapter
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff

BASE = {"height": 64, "width": 64, "num_inference_steps": 2}
PROMPT_A = {"prompt": "turn this into a painting", "negative_prompt": " "}
PROMPT_B = {"prompt": "a small green circle at the top left", "negative_prompt": "blue"}


def random_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def open_omni(folder: str) -> Omni:
    return Omni(model=folder, max_batch_size=4)


def diffusers_pipeline(folder: str, class_name: str) -> Any:
    import diffusers

    adapter_class = QwenImageEditAdapter
    pipe = getattr(diffusers, class_name).from_pretrained(folder, **adapter_class.preloaded_components(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class EditFamily:
    """One edit family's runs, made once and shared by its tests."""

    def __init__(self, builder: str, class_name: str, images_a: list[Image.Image],
                 images_b: list[Image.Image]) -> None:
        self.folder = tiny_pipeline_dir(builder)
        self.class_name = class_name
        self.images_a, self.images_b = images_a, images_b
        self.omni = open_omni(self.folder)

    def image_argument(self, images: list[Image.Image]) -> Any:
        # QwenImageEditPipeline takes one image; a list there would mean one image per prompt
        return images if self.class_name == "QwenImageEditPlusPipeline" else images[0]

    def reference(self) -> Image.Image:
        pipe = diffusers_pipeline(self.folder, self.class_name)
        return pipe(**PROMPT_A, image=self.image_argument(self.images_a), true_cfg_scale=4.0,
                    generator=torch.Generator("cpu").manual_seed(0), **BASE).images[0]

    def request(self, prompt: dict, images: list[Image.Image]) -> dict:
        return {**prompt, "multi_modal_data": {"image": images}}

    def solo(self, prompt: dict, images: list[Image.Image], seed: int) -> Any:
        return self.omni.generate(self.request(prompt, images), seed=seed, true_cfg_scale=4.0, **BASE)[0]

    def batch(self) -> list[Any]:
        requests = [self.request(PROMPT_A, self.images_a), self.request(PROMPT_B, self.images_b)]
        return self.omni.generate(requests, [{"seed": 0}, {"seed": 5}], true_cfg_scale=4.0, **BASE)


FAMILIES = {
    "edit": ("qwen_image_edit", "QwenImageEditPipeline", [random_image(0)], [random_image(1)]),
    "edit_plus": ("qwen_image_edit_plus", "QwenImageEditPlusPipeline",
                  [random_image(0), random_image(1, (48, 64))], [random_image(2), random_image(3, (48, 64))]),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def runs(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    family = EditFamily(*FAMILIES[request.param])
    try:
        yield {"family": family, "reference": family.reference(),
               "solo_a": family.solo(PROMPT_A, family.images_a, seed=0),
               "solo_b": family.solo(PROMPT_B, family.images_b, seed=5), "batch": family.batch()}
    finally:
        family.omni.close()


def test_matches_diffusers(runs: dict[str, Any]) -> None:
    assert max_abs_diff(runs["solo_a"].images[0], runs["reference"]) <= 3


def test_parity_oracle_detects_a_different_request(runs: dict[str, Any]) -> None:
    assert max_abs_diff(runs["solo_b"].images[0], runs["reference"]) > 10


def test_batch_with_different_prompts_seeds_and_images_equals_solo(runs: dict[str, Any]) -> None:
    batch = runs["batch"]
    assert [o.timings["batch_size"] for o in batch] == [2, 2]
    assert max_abs_diff(batch[0].images[0], runs["solo_a"].images[0]) <= 3
    assert max_abs_diff(batch[1].images[0], runs["solo_b"].images[0]) <= 3


def test_embedding_depends_on_images_so_is_never_cached(runs: dict[str, Any]) -> None:
    family = runs["family"]
    request = family.omni.engine.make_request(PROMPT_A["prompt"], images=family.images_a)
    assert family.omni.engine.adapter.prompt_cache_key(request) is None


def test_default_output_size_follows_the_input_image(runs: dict[str, Any]) -> None:
    family = runs["family"]
    adapter = family.omni.engine.adapter
    # 64x48 (4:3) at diffusers' 1024x1024 area: 1184x896, floored to the size multiple
    wide = family.omni.engine.make_request("x", images=[random_image(0, (64, 48))] * len(family.images_a))
    height, width = adapter.output_size(wide)
    assert (height, width) == (896 // adapter.size_multiple * adapter.size_multiple,
                               1184 // adapter.size_multiple * adapter.size_multiple)
    # the request reports the size that will really run
    assert (wide.params.height, wide.params.width) == (height, width)


def test_missing_input_image_is_refused(runs: dict[str, Any]) -> None:
    with pytest.raises(InvalidParameterError) as error:
        runs["family"].omni.generate(PROMPT_A, **BASE)
    assert error.value.param == "image"


def test_size_not_a_multiple_is_refused(runs: dict[str, Any]) -> None:
    family = runs["family"]
    with pytest.raises(InvalidParameterError) as error:
        family.omni.generate(family.request(PROMPT_A, family.images_a), height=80, width=64, num_inference_steps=2)
    assert error.value.param == "height"


def test_input_image_count(runs: dict[str, Any]) -> None:
    family = runs["family"]
    three_images = [random_image(0)] * 3
    if family.class_name == "QwenImageEditPlusPipeline":
        family.omni.engine.make_request("x", images=three_images)  # several images are its point
        return
    with pytest.raises(InvalidParameterError) as error:
        family.omni.engine.make_request("x", images=three_images)
    assert error.value.param == "image"
