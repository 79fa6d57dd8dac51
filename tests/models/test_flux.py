"""FLUX.1 parity: ditserve's shared loop equals diffusers' own FluxPipeline on the same weights and seed."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline

from ditserve import Omni
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff

PROMPT = "a small red circle at the top left"
BASE = {"height": 64, "width": 64, "num_inference_steps": 4, "max_sequence_length": 64}


@pytest.fixture(scope="module")
def diffusers_flux(tiny_flux_dir: str) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(pipe: FluxPipeline, prompt: str = PROMPT, seed: int = 0, **overrides):
    kwargs = {**BASE, **overrides}
    return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images


@pytest.mark.parametrize("guidance", [{}, {"negative_prompt": "", "true_cfg_scale": 3.0}],
                         ids=["no-cfg", "true-cfg"])
def test_matches_diffusers(flux_omni: Omni, diffusers_flux: FluxPipeline, guidance: dict) -> None:
    ours = flux_omni.generate(PROMPT, seed=7, **BASE, **guidance)[0].images[0]
    assert max_abs_diff(ours, reference(diffusers_flux, seed=7, **guidance)[0]) <= 3


def test_parity_oracle_detects_wrong_prompt_seed_and_steps(flux_omni: Omni, diffusers_flux: FluxPipeline) -> None:
    ours = flux_omni.generate(PROMPT, seed=7, **BASE)[0].images[0]
    assert max_abs_diff(ours, reference(diffusers_flux, prompt="a blue dog", seed=7)[0]) > 15
    assert max_abs_diff(ours, reference(diffusers_flux, seed=8)[0]) > 15
    assert max_abs_diff(ours, reference(diffusers_flux, seed=7, num_inference_steps=5)[0]) > 15


def test_several_outputs_per_prompt_match_diffusers(flux_omni: Omni, diffusers_flux: FluxPipeline) -> None:
    ours = flux_omni.generate(PROMPT, seed=3, num_outputs_per_prompt=2, **BASE)[0].images
    theirs = reference(diffusers_flux, seed=3, num_images_per_prompt=2)
    assert len(ours) == 2
    assert all(max_abs_diff(a, b) <= 3 for a, b in zip(ours, theirs, strict=True))


def test_embedded_guidance_matches_diffusers() -> None:
    folder = tiny_pipeline_dir("flux_dev")
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    with Omni(model=folder) as omni:
        ours = omni.generate(PROMPT, seed=1, guidance_scale=5.0, **BASE)[0].images[0]
        other_guidance = omni.generate(PROMPT, seed=1, guidance_scale=1.0, **BASE)[0].images[0]
    assert max_abs_diff(ours, reference(pipe, seed=1, guidance_scale=5.0)[0]) <= 3
    assert max_abs_diff(ours, other_guidance) > 3


@pytest.mark.parametrize(("param", "value"), [("guidance_scale_2", 2.0), ("boundary_ratio", 0.5), ("fps", 8)])
def test_params_flux_does_not_use_are_refused_by_name(flux_omni: Omni, param: str, value: float) -> None:
    from ditserve.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match=f"{param} is not a parameter of FluxPipeline") as refused:
        flux_omni.generate("a red circle", {"height": 64, "width": 64, "num_inference_steps": 1, param: value})
    assert refused.value.param == param
