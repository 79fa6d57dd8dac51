"""Qwen-Image-Layered parity: ditserve's shared loop equals diffusers' own QwenImageLayeredPipeline on the same
weights, prompt, input image and seed, layer by layer.

Each run VAE-encodes the input at about 640x640 pixels (the pipeline's smallest resolution) and decodes every
layer at that size, the slow part on a CPU, so the runs are made once and shared: the reference (two outputs of
two layers each), the same request through Omni, a second request alone, both in one batch, and an empty prompt
(captioned by Qwen2.5-VL) through both.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import QwenImageLayeredPipeline
from PIL import Image

from ditserve import Omni, OmniDiffusionSamplingParams
from ditserve.entrypoints.omni import as_pil_images
from ditserve.errors import InvalidParameterError
from ditserve.models.base import ImageMode
from ditserve.models.qwen_image.layered import QwenImageLayeredAdapter
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff

BASE = {"num_inference_steps": 2, "layers": 2}
CFG = {"negative_prompt": " ", "true_cfg_scale": 4.0}


def rgba_image(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(pixels, "RGBA")


IMAGE_A, IMAGE_B = rgba_image(0), rgba_image(1)
REQUEST_A = {"prompt": "a red cat", **CFG}
REQUEST_B = {"prompt": "a large blue square at the bottom right", "negative_prompt": "green", "true_cfg_scale": 3.0}


def diffusers_run(folder: str, prompt: str, image: Image.Image, seed: int, **kwargs: Any) -> list[list[Image.Image]]:
    pipe = QwenImageLayeredPipeline.from_pretrained(folder, **QwenImageLayeredAdapter.preloaded_components(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe(image=image, prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed),
                **{**BASE, **kwargs}).images


def item(request: dict, image: Image.Image) -> dict:
    options = {k: v for k, v in request.items() if k in ("prompt", "negative_prompt")}
    return {**options, "multi_modal_data": {"image": image}}


def params(request: dict, seed: int, **overrides: Any) -> dict:
    return {**BASE, "seed": seed, "true_cfg_scale": request.get("true_cfg_scale", 1.0), **overrides}


@pytest.fixture(scope="module")
def folder() -> str:
    return tiny_pipeline_dir("qwen_image_layered")


@pytest.fixture(scope="module")
def omni(folder: str) -> Iterator[Omni]:
    with Omni(model=folder, max_batch_size=4) as omni:
        yield omni


@pytest.fixture(scope="module")
def runs(folder: str, omni: Omni) -> dict[str, Any]:
    return {
        "reference": diffusers_run(folder, REQUEST_A["prompt"], IMAGE_A, seed=0, negative_prompt=" ",
                                   true_cfg_scale=4.0, num_images_per_prompt=2),
        "solo_a": omni.generate(item(REQUEST_A, IMAGE_A), params(REQUEST_A, 0, num_outputs_per_prompt=2))[0],
        "solo_b": omni.generate(item(REQUEST_B, IMAGE_B), params(REQUEST_B, 5))[0],
        "batch": omni.generate([item(REQUEST_A, IMAGE_A), item(REQUEST_B, IMAGE_B)],
                               [params(REQUEST_A, 0, num_outputs_per_prompt=2), params(REQUEST_B, 5)]),
    }


def test_serves_it_on_its_adapter(omni: Omni) -> None:
    assert type(omni.engine.adapter) is QwenImageLayeredAdapter
    assert omni.model_kind == "edit"


def test_layers_match_diffusers_in_order(runs: dict[str, Any]) -> None:
    # two outputs of two layers each: output-major, each output's layers in the pipeline's order. diffusers
    # 0.42.1 decodes them in that order but regroups them per output by layers + 1 (it counts the dropped
    # composite), so its flattened list is the reference
    ours, theirs = runs["solo_a"].images, [layer for output in runs["reference"] for layer in output]
    assert len(ours) == len(theirs) == 4
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.mode == "RGBA" and mine.size == reference.size
        assert max_abs_diff(mine, reference) <= 3
    # every layer differs from the others, so the order above is checked
    assert min(max_abs_diff(a, b) for i, a in enumerate(ours) for b in ours[i + 1:]) > 10


def test_parity_oracle_detects_a_different_request(runs: dict[str, Any]) -> None:
    assert max_abs_diff(runs["solo_b"].images[0], runs["reference"][0][0]) > 10


def test_size_follows_the_input_image_at_the_resolution(runs: dict[str, Any], omni: Omni) -> None:
    # 64x48 (4:3) at 640x640 pixels: diffusers' 736x544
    assert runs["solo_a"].images[0].size == (736, 544)
    request = omni.engine.make_request("x", images=[rgba_image(0, (48, 64))])
    assert (request.params.width, request.params.height) == (544, 736)
    large = omni.engine.make_request("x", OmniDiffusionSamplingParams(resolution=1024), images=[IMAGE_A])
    assert (large.params.width, large.params.height) == (1184, 896)


def test_batch_with_different_prompts_seeds_images_and_guidance_equals_solo(runs: dict[str, Any]) -> None:
    batch = runs["batch"]
    assert [o.timings["batch_size"] for o in batch] == [2, 2]
    for together, alone in zip(batch, (runs["solo_a"], runs["solo_b"]), strict=True):
        assert len(together.images) == len(alone.images)
        assert all(max_abs_diff(a, b) <= 1 for a, b in zip(together.images, alone.images, strict=True))


def test_an_empty_prompt_is_captioned_as_diffusers_does(folder: str, omni: Omni) -> None:
    ours = omni.generate(item({"prompt": ""}, IMAGE_B), params({}, 3, layers=1))[0].images
    theirs = diffusers_run(folder, "", IMAGE_B, seed=3, layers=1)[0]
    assert max_abs_diff(ours[0], theirs[0]) <= 3
    request = omni.engine.make_request("", images=[IMAGE_B])
    assert omni.engine.adapter.prompt_cache_key(request) is None  # the caption depends on the image


def test_an_rgb_input_reads_as_opaque_rgba(omni: Omni) -> None:
    rgb = Image.new("RGB", (64, 48), (200, 10, 30))
    (image,) = as_pil_images(rgb, omni.engine.adapter.input_image_mode)
    assert image.mode == "RGBA" and image.getpixel((0, 0)) == (200, 10, 30, 255)
    # other families keep reading RGB
    (image,) = as_pil_images(rgba_image(0), ImageMode.RGB)
    assert image.mode == "RGB"


@pytest.mark.parametrize("overrides, field", [
    ({"height": 544}, "height"),
    ({"width": 736}, "width"),
    ({"resolution": 512}, "resolution"),
    ({"layers": 0}, "layers"),
    ({"layers": 17}, "layers"),
    ({"guidance_scale": 3.0}, "guidance_scale"),
    ({"num_frames": 5}, "num_frames"),
])
def test_bad_params_raise_naming_the_field(omni: Omni, overrides: dict, field: str) -> None:
    with pytest.raises(InvalidParameterError) as error:
        omni.generate(item({"prompt": "x"}, IMAGE_A), {**BASE, **overrides})
    assert error.value.param == field


def test_input_image_is_required_and_only_one(omni: Omni) -> None:
    with pytest.raises(InvalidParameterError) as error:
        omni.generate("a red cat", BASE)
    assert error.value.param == "image"
    with pytest.raises(InvalidParameterError) as error:
        omni.engine.make_request("x", images=[IMAGE_A, IMAGE_B])
    assert error.value.param == "image"


def test_other_families_refuse_layers_and_resolution() -> None:
    with Omni(tiny_pipeline_dir("qwen_image")) as omni:
        for name, value in (("layers", 2), ("resolution", 640)):
            with pytest.raises(InvalidParameterError, match="Qwen-Image-Layered") as error:
                omni.generate("a red cat", {"height": 64, "width": 64, name: value})
            assert error.value.param == name


def test_inputs_resized_to_the_same_condition_share_steps(omni: Omni) -> None:
    adapter, engine = omni.engine.adapter, omni.engine

    def key(image: Image.Image, **params) -> tuple:
        return adapter.step_key(engine.make_request("x", OmniDiffusionSamplingParams(**params), images=[image]))

    # 64x48 and 128x96 are both resized to 736x544; another aspect ratio or layer count is another shape
    assert key(rgba_image(0)) == key(rgba_image(1, (128, 96)))
    assert key(rgba_image(0)) != key(rgba_image(0, (48, 64)))
    assert key(rgba_image(0)) != key(rgba_image(0), layers=3)
