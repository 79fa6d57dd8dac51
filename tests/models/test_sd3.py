"""Stable Diffusion 3.5 parity: ditserve's shared loop equals diffusers' own StableDiffusion3Pipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from ditserve import Omni
from ditserve.config import OmniDiffusionSamplingParams
from ditserve.errors import InvalidParameterError
from ditserve.models.sd3.adapter import StableDiffusion3Adapter
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff

PROMPT = "a small red circle at the top left"
BASE = {"height": 64, "width": 64, "num_inference_steps": 3, "max_sequence_length": 32}


@pytest.fixture(scope="module")
def sd3_dir() -> str:
    return tiny_pipeline_dir("sd3")


@pytest.fixture(scope="module")
def diffusers_sd3(sd3_dir: str) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sd3_omni(sd3_dir: str):
    omni = Omni(model=sd3_dir, max_batch_size=4)
    yield omni
    omni.close()


def reference(pipe: StableDiffusion3Pipeline, prompt: str = PROMPT, seed: int = 0, **overrides):
    kwargs = {**BASE, **overrides}
    return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images


def test_uses_the_sd3_adapter(sd3_omni: Omni) -> None:
    assert isinstance(sd3_omni.engine.adapter, StableDiffusion3Adapter)


@pytest.mark.parametrize("guidance", [{}, {"negative_prompt": "a blue dog"}, {"guidance_scale": 1.0}],
                         ids=["cfg-default", "cfg-negative", "no-cfg"])
def test_matches_diffusers(sd3_omni: Omni, diffusers_sd3: StableDiffusion3Pipeline, guidance: dict) -> None:
    ours = sd3_omni.generate(PROMPT, seed=5, **BASE, **guidance)[0].images[0]
    assert max_abs_diff(ours, reference(diffusers_sd3, seed=5, **guidance)[0]) <= 3


def test_parity_oracle_detects_wrong_prompt_seed_and_steps(sd3_omni: Omni,
                                                           diffusers_sd3: StableDiffusion3Pipeline) -> None:
    ours = sd3_omni.generate(PROMPT, seed=5, **BASE)[0].images[0]
    assert max_abs_diff(ours, reference(diffusers_sd3, prompt="a blue dog", seed=5)[0]) > 15
    assert max_abs_diff(ours, reference(diffusers_sd3, seed=6)[0]) > 15
    assert max_abs_diff(ours, reference(diffusers_sd3, seed=5, num_inference_steps=4)[0]) > 15


def test_several_outputs_per_prompt_match_diffusers(sd3_omni: Omni,
                                                    diffusers_sd3: StableDiffusion3Pipeline) -> None:
    ours = sd3_omni.generate(PROMPT, seed=3, num_outputs_per_prompt=2, **BASE)[0].images
    theirs = reference(diffusers_sd3, seed=3, num_images_per_prompt=2)
    assert len(ours) == 2
    assert all(max_abs_diff(a, b) <= 3 for a, b in zip(ours, theirs, strict=True))


def test_batched_equals_solo(sd3_omni: Omni) -> None:
    prompts = [PROMPT, "a green triangle"]
    params = [OmniDiffusionSamplingParams(**BASE, seed=11, negative_prompt="blue"),
              OmniDiffusionSamplingParams(**BASE, seed=12, negative_prompt="a red square at the bottom")]
    solo = [sd3_omni.generate(p, sp)[0].images[0] for p, sp in zip(prompts, params, strict=True)]
    through_generate = sd3_omni.generate(prompts, params)
    # straight to the runner: the two requests certainly share one batch
    requests = [sd3_omni.engine.make_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    one_batch = sd3_omni.engine.runner.execute(requests)
    assert [o.timings["batch_size"] for o in one_batch] == [2, 2]
    for alone, generated, batched in zip(solo, through_generate, one_batch, strict=True):
        assert max_abs_diff(alone, generated.images[0]) <= 1
        assert max_abs_diff(alone, batched.images[0]) <= 1
    assert max_abs_diff(solo[0], solo[1]) > 15


@pytest.mark.parametrize(("bad", "param"), [
    ({"height": 66}, "height"),
    ({"true_cfg_scale": 4.0}, "true_cfg_scale"),
    ({"guidance_scale_2": 2.0}, "guidance_scale_2"),
    ({"max_sequence_length": 600}, "max_sequence_length"),
    ({"num_frames": 5}, "num_frames"),
    ({"guidance_scale": 1.0, "negative_prompt": "blurry"}, "negative_prompt"),
])
def test_bad_input_names_its_field(sd3_omni: Omni, bad: dict, param: str) -> None:
    with pytest.raises(InvalidParameterError) as error:
        sd3_omni.generate(PROMPT, **{**BASE, **bad})
    assert error.value.param == param
