"""Wan2.x text-to-video parity: ditserve's shared loop equals diffusers' own WanPipeline, for the one-expert
layout, the Wan2.2 A14B two-expert layout and the TI2V (per-token timestep) layout."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from ditserve import Omni
from ditserve.config import OmniDiffusionSamplingParams
from ditserve.errors import InvalidParameterError
from ditserve.models.common import to_uint8_video
from ditserve.models.wan.adapter import WanAdapter
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff

PROMPT = "a small red circle at the top left"
#: 4 steps: with the tiny A14B's boundary, two steps run on each expert
BASE = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 4, "max_sequence_length": 32}


def load_diffusers(family: str) -> WanPipeline:
    pipe = WanPipeline.from_pretrained(tiny_pipeline_dir(family))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def diffusers_wan() -> WanPipeline:
    return load_diffusers("wan")


@pytest.fixture(scope="module")
def diffusers_a14b() -> WanPipeline:
    return load_diffusers("wan_a14b")


@pytest.fixture(scope="module")
def wan_omni():
    omni = Omni(model=tiny_pipeline_dir("wan"), max_batch_size=4)
    yield omni
    omni.close()


@pytest.fixture(scope="module")
def a14b_omni():
    omni = Omni(model=tiny_pipeline_dir("wan_a14b"), max_batch_size=4)
    yield omni
    omni.close()


def reference(pipe: WanPipeline, prompt: str = PROMPT, seed: int = 0, **overrides) -> list[np.ndarray]:
    kwargs = {**BASE, **overrides}
    frames = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).frames
    return [to_uint8_video(video) for video in frames]


def test_output_is_a_uint8_video_with_fps(wan_omni: Omni) -> None:
    assert isinstance(wan_omni.engine.adapter, WanAdapter)
    output = wan_omni.generate(PROMPT, seed=1, **BASE)[0]
    assert output.images == []
    (video,) = output.videos
    assert video.shape == (5, 32, 32, 3) and video.dtype == np.uint8
    assert output.fps == 16
    assert wan_omni.generate(PROMPT, seed=1, fps=24, **BASE)[0].fps == 24


@pytest.mark.parametrize("guidance", [{}, {"negative_prompt": "a blue dog"}, {"guidance_scale": 1.0}],
                         ids=["cfg-default", "cfg-negative", "no-cfg"])
def test_matches_diffusers(wan_omni: Omni, diffusers_wan: WanPipeline, guidance: dict) -> None:
    ours = wan_omni.generate(PROMPT, seed=5, **BASE, **guidance)[0].videos[0]
    assert max_abs_diff(ours, reference(diffusers_wan, seed=5, **guidance)[0]) <= 3


def test_parity_oracle_detects_wrong_prompt_seed_and_steps(wan_omni: Omni, diffusers_wan: WanPipeline) -> None:
    ours = wan_omni.generate(PROMPT, seed=5, **BASE)[0].videos[0]
    assert max_abs_diff(ours, reference(diffusers_wan, prompt="a blue dog", seed=5)[0]) > 15
    assert max_abs_diff(ours, reference(diffusers_wan, seed=6)[0]) > 15
    assert max_abs_diff(ours, reference(diffusers_wan, seed=5, num_inference_steps=5)[0]) > 15


def test_several_outputs_per_prompt_match_diffusers(wan_omni: Omni, diffusers_wan: WanPipeline) -> None:
    ours = wan_omni.generate(PROMPT, seed=3, num_outputs_per_prompt=2, **BASE)[0].videos
    theirs = reference(diffusers_wan, seed=3, num_videos_per_prompt=2)
    assert len(ours) == 2
    assert all(max_abs_diff(a, b) <= 3 for a, b in zip(ours, theirs, strict=True))


def test_batched_equals_solo(a14b_omni: Omni) -> None:
    prompts = [PROMPT, "a green triangle"]
    params = [OmniDiffusionSamplingParams(**BASE, seed=11, negative_prompt="blue"),
              OmniDiffusionSamplingParams(**BASE, seed=12, negative_prompt="a red square at the bottom")]
    solo = [a14b_omni.generate(p, sp)[0].videos[0] for p, sp in zip(prompts, params, strict=True)]
    through_generate = a14b_omni.generate(prompts, params)
    # straight to the runner: the two requests certainly share one batch
    requests = [a14b_omni.engine.make_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    one_batch = a14b_omni.engine.runner.execute(requests)
    assert [o.timings["batch_size"] for o in one_batch] == [2, 2]
    for alone, generated, batched in zip(solo, through_generate, one_batch, strict=True):
        assert max_abs_diff(alone, generated.videos[0]) <= 1
        assert max_abs_diff(alone, batched.videos[0]) <= 1
    assert max_abs_diff(solo[0], solo[1]) > 15


# ---------------------------------------------------------------------- Wan2.2 A14B: two experts
@pytest.mark.parametrize("guidance", [{}, {"guidance_scale_2": 2.0}, {"guidance_scale": 1.0}],
                         ids=["same-guidance", "guidance-2", "no-cfg"])
def test_a14b_matches_diffusers(a14b_omni: Omni, diffusers_a14b: WanPipeline, guidance: dict) -> None:
    ours = a14b_omni.generate(PROMPT, seed=5, **BASE, **guidance)[0].videos[0]
    assert max_abs_diff(ours, reference(diffusers_a14b, seed=5, **guidance)[0]) <= 3


def test_a14b_switches_experts_at_the_boundary(a14b_omni: Omni) -> None:
    pipeline = a14b_omni.engine.runner.model.pipeline
    calls: Counter[str] = Counter()
    handles = [getattr(pipeline, name).register_forward_pre_hook(lambda *_, n=name: calls.update([n]))
               for name in ("transformer", "transformer_2")]
    try:
        a14b_omni.generate(PROMPT, seed=5, **BASE)
    finally:
        for handle in handles:
            handle.remove()
    # timesteps 999, 900 >= 0.9 * 1000 on the high-noise expert, 750, 500 on the low-noise one; two branches each
    assert calls == {"transformer": 4, "transformer_2": 4}


def test_a14b_boundary_ratio_per_request_matches_diffusers_config(a14b_omni: Omni) -> None:
    pipe = load_diffusers("wan_a14b")
    pipe.register_to_config(boundary_ratio=0.6)
    ours = a14b_omni.generate(PROMPT, seed=5, boundary_ratio=0.6, **BASE)[0].videos[0]
    assert max_abs_diff(ours, reference(pipe, seed=5)[0]) <= 3
    assert max_abs_diff(ours, a14b_omni.generate(PROMPT, seed=5, **BASE)[0].videos[0]) > 3


def test_ti2v_per_token_timesteps_match_diffusers() -> None:
    folder = tiny_pipeline_dir("wan_ti2v")
    with Omni(model=folder) as omni:
        ours = omni.generate(PROMPT, seed=5, **BASE)[0].videos[0]
    assert max_abs_diff(ours, reference(load_diffusers("wan_ti2v"), seed=5)[0]) <= 3


@pytest.mark.parametrize(("bad", "param"), [
    ({"num_frames": 6}, "num_frames"),
    ({"height": 40}, "height"),
    ({"true_cfg_scale": 4.0}, "true_cfg_scale"),
    ({"guidance_scale_2": 2.0}, "guidance_scale_2"),
    ({"boundary_ratio": 0.5}, "boundary_ratio"),
    ({"guidance_scale": 1.0, "negative_prompt": "blurry"}, "negative_prompt"),
])
def test_bad_input_names_its_field(wan_omni: Omni, bad: dict, param: str) -> None:
    with pytest.raises(InvalidParameterError) as error:
        wan_omni.generate(PROMPT, **{**BASE, **bad})
    assert error.value.param == param


def test_a14b_low_noise_guidance_without_guidance_is_an_error(a14b_omni: Omni) -> None:
    with pytest.raises(InvalidParameterError) as error:
        a14b_omni.generate(PROMPT, **BASE, guidance_scale=1.0, guidance_scale_2=4.0)
    assert error.value.param == "guidance_scale_2"
