"""Qwen-Image parity: ditserve's shared loop equals diffusers' own QwenImagePipeline on the same weights and seed."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImagePipeline
from PIL import Image

from ditserve import Omni, OmniDiffusionSamplingParams
from ditserve.errors import InvalidParameterError
from ditserve.models.base import RequestState
from ditserve.models.qwen_image.adapter import norm_preserving_cfg, pad_and_mask
from ditserve.request import Request
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff

PROMPT = "a small red circle at the top left"
CFG = {"negative_prompt": " ", "true_cfg_scale": 4.0}
BASE = {"height": 64, "width": 64, "num_inference_steps": 2, "max_sequence_length": 64}


@pytest.fixture(scope="module")
def folder() -> str:
    return tiny_pipeline_dir("qwen_image")


@pytest.fixture(scope="module")
def diffusers_qwen(folder: str) -> QwenImagePipeline:
    pipe = QwenImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def qwen_omni(folder: str):
    omni = Omni(model=folder, max_batch_size=4)
    yield omni
    omni.close()


def reference(pipe: QwenImagePipeline, prompt: str = PROMPT, seed: int = 0, **overrides) -> list[Image.Image]:
    kwargs = {**BASE, **overrides}
    return pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images


def ours(omni: Omni, prompt: str = PROMPT, seed: int = 0, **overrides) -> list[Image.Image]:
    params = {**BASE, **overrides}
    negative = params.pop("negative_prompt", None)
    return omni.generate({"prompt": prompt, "negative_prompt": negative}, seed=seed, **params)[0].images


@pytest.mark.parametrize("guidance", [{"true_cfg_scale": 1.0}, CFG], ids=["no-cfg", "true-cfg"])
def test_matches_diffusers(qwen_omni: Omni, diffusers_qwen: QwenImagePipeline, guidance: dict) -> None:
    assert max_abs_diff(ours(qwen_omni, seed=7, **guidance)[0], reference(diffusers_qwen, seed=7, **guidance)[0]) <= 3


def test_parity_oracle_detects_wrong_prompt_seed_and_steps(qwen_omni: Omni,
                                                           diffusers_qwen: QwenImagePipeline) -> None:
    image = ours(qwen_omni, seed=7, **CFG)[0]
    assert max_abs_diff(image, reference(diffusers_qwen, prompt="a blue dog", seed=7, **CFG)[0]) > 10
    assert max_abs_diff(image, reference(diffusers_qwen, seed=8, **CFG)[0]) > 10
    assert max_abs_diff(image, reference(diffusers_qwen, seed=7, **{**CFG, "num_inference_steps": 3})[0]) > 10


def test_several_outputs_per_prompt_match_diffusers(qwen_omni: Omni, diffusers_qwen: QwenImagePipeline) -> None:
    mine = ours(qwen_omni, seed=3, num_outputs_per_prompt=2, **CFG)
    theirs = reference(diffusers_qwen, seed=3, num_images_per_prompt=2, **CFG)
    assert len(mine) == 2
    assert all(max_abs_diff(a, b) <= 3 for a, b in zip(mine, theirs, strict=True))


def test_batch_of_prompts_of_different_lengths_equals_solo(qwen_omni: Omni) -> None:
    prompts = [{"prompt": "a cat", "negative_prompt": " "},
               {"prompt": "a large blue square at the bottom right in the background", "negative_prompt": "red"}]
    batch = qwen_omni.generate(prompts, [{"seed": 1}, {"seed": 2}], **BASE)
    assert [o.timings["batch_size"] for o in batch] == [2, 2]
    for output, prompt, seed in zip(batch, prompts, (1, 2), strict=True):
        solo = qwen_omni.generate(prompt, seed=seed, **BASE)[0]
        assert solo.timings["batch_size"] == 1
        assert max_abs_diff(output.images[0], solo.images[0]) <= 3


def test_pad_and_mask_masks_only_padding() -> None:
    # two requests in one step: the first with two outputs (rows), the second with one
    states = [RequestState(Request(prompt, OmniDiffusionSamplingParams(seed=0)), torch.zeros(rows, 4), None,
                           torch.zeros(1), {}) for prompt, rows in (("a", 2), ("b", 1))]
    embeds, mask = pad_and_mask([torch.ones(1, 2, 3), torch.ones(1, 4, 3)], states)
    assert embeds.shape == (3, 4, 3)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert embeds[:2, 2:].abs().sum() == 0
    _, no_mask = pad_and_mask([torch.ones(1, 4, 3), torch.ones(1, 4, 3)], states)
    assert no_mask is None


def test_true_cfg_keeps_the_conditional_norm_per_token() -> None:
    cond, uncond = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    combined = norm_preserving_cfg(cond, uncond, 4.0)
    torch.testing.assert_close(combined.norm(dim=-1), cond.norm(dim=-1))
    direction = uncond + 4.0 * (cond - uncond)
    torch.testing.assert_close(combined / combined.norm(dim=-1, keepdim=True),
                               direction / direction.norm(dim=-1, keepdim=True))


def test_prompt_cache_key_follows_text_and_guidance_not_seed(qwen_omni: Omni) -> None:
    engine = qwen_omni.engine

    def key(prompt: str, **overrides) -> tuple:
        request = engine.make_request(prompt, OmniDiffusionSamplingParams(**{**BASE, **overrides}))
        return engine.adapter.prompt_cache_key(request)

    assert key(PROMPT, seed=1) == key(PROMPT, seed=2)
    assert key(PROMPT) != key("a blue dog")
    assert key(PROMPT, **CFG) != key(PROMPT, negative_prompt="red", true_cfg_scale=4.0)


@pytest.mark.parametrize("params, field", [
    ({"height": 68}, "height"),
    ({"max_sequence_length": 1025}, "max_sequence_length"),
    ({"guidance_scale": 3.5}, "guidance_scale"),
    ({"true_cfg_scale": 4.0}, "true_cfg_scale"),
    ({"negative_prompt": "blurry", "true_cfg_scale": 1.0}, "negative_prompt"),
    ({"num_frames": 5}, "num_frames"),
])
def test_bad_params_raise_naming_the_field(qwen_omni: Omni, params: dict, field: str) -> None:
    with pytest.raises(InvalidParameterError) as error:
        qwen_omni.generate(PROMPT, **{**BASE, **params})
    assert error.value.param == field


def test_input_image_is_refused(qwen_omni: Omni) -> None:
    image = Image.new("RGB", (64, 64))
    with pytest.raises(InvalidParameterError) as error:
        qwen_omni.generate({"prompt": PROMPT, "multi_modal_data": {"image": image}}, **BASE)
    assert error.value.param == "image"
