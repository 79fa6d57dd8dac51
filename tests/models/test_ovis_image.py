"""Ovis-Image parity: ditserve's shared loop equals diffusers' own OvisImagePipeline on the same weights and seed."""

from __future__ import annotations

import pytest
import torch
from diffusers import OvisImagePipeline
from PIL import Image

from ditserve import Omni
from ditserve.errors import InvalidParameterError
from ditserve.models.ovis_image.adapter import OvisImageAdapter
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff

PROMPT = "a small red circle at the top left"
# Ovis drops its system prompt's first 28 tokens and keeps max_sequence_length after them: the tiny tokenizer
# spells the system prompt letter by letter, so the user prompt only fits with room to spare
BASE = {"height": 64, "width": 64, "num_inference_steps": 3, "max_sequence_length": 128}


@pytest.fixture(scope="module")
def folder() -> str:
    return tiny_pipeline_dir("ovis_image")


@pytest.fixture(scope="module")
def diffusers_ovis(folder: str) -> OvisImagePipeline:
    pipe = OvisImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ovis_omni(folder: str):
    omni = Omni(model=folder, max_batch_size=4)
    yield omni
    omni.close()


def reference(pipe: OvisImagePipeline, prompt: str = PROMPT, seed: int = 0, **overrides) -> list[Image.Image]:
    return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **{**BASE, **overrides}).images


def ours(omni: Omni, prompt: str = PROMPT, seed: int = 0, **overrides) -> list[Image.Image]:
    params = {**BASE, **overrides}
    negative = params.pop("negative_prompt", None)
    return omni.generate({"prompt": prompt, "negative_prompt": negative}, seed=seed, **params)[0].images


def test_runs_on_its_adapter(ovis_omni: Omni) -> None:
    assert type(ovis_omni.engine.adapter) is OvisImageAdapter
    assert ovis_omni.engine.runner.steps_in_loop


@pytest.mark.parametrize("guidance", [{}, {"negative_prompt": "a blue dog", "guidance_scale": 3.0},
                                      {"guidance_scale": 1.0}], ids=["default-cfg", "negative-prompt", "no-cfg"])
def test_matches_diffusers(ovis_omni: Omni, diffusers_ovis: OvisImagePipeline, guidance: dict) -> None:
    assert max_abs_diff(ours(ovis_omni, seed=5, **guidance)[0], reference(diffusers_ovis, seed=5, **guidance)[0]) <= 3


def test_parity_oracle_detects_wrong_prompt_seed_steps_and_guidance(ovis_omni: Omni,
                                                                    diffusers_ovis: OvisImagePipeline) -> None:
    image = ours(ovis_omni, seed=5)[0]
    assert max_abs_diff(image, reference(diffusers_ovis, prompt="a blue dog", seed=5)[0]) > 15
    assert max_abs_diff(image, reference(diffusers_ovis, seed=6)[0]) > 15
    assert max_abs_diff(image, reference(diffusers_ovis, seed=5, num_inference_steps=4)[0]) > 15
    assert max_abs_diff(image, reference(diffusers_ovis, seed=5, guidance_scale=1.0)[0]) > 15


def test_several_outputs_per_prompt_match_diffusers(ovis_omni: Omni, diffusers_ovis: OvisImagePipeline) -> None:
    mine = ours(ovis_omni, seed=3, num_outputs_per_prompt=2)
    theirs = reference(diffusers_ovis, seed=3, num_images_per_prompt=2)
    assert len(mine) == 2
    assert all(max_abs_diff(a, b) <= 3 for a, b in zip(mine, theirs, strict=True))
    assert max_abs_diff(mine[0], mine[1]) > 15


def test_batch_with_other_prompts_seeds_and_guidance_equals_solo(ovis_omni: Omni) -> None:
    requests = [{"prompt": "a cat", "negative_prompt": "red"}, {"prompt": "a large blue square at the bottom right"},
                {"prompt": "a green triangle"}]
    params = [{**BASE, "seed": 1, "guidance_scale": 4.0}, {**BASE, "seed": 2},
              {**BASE, "seed": 3, "guidance_scale": 1.0, "num_inference_steps": 2}]
    batch = ovis_omni.generate(requests, params)
    assert [o.timings["batch_size"] for o in batch] == [3, 3, 3]
    for output, request, p in zip(batch, requests, params, strict=True):
        solo = ovis_omni.generate(request, p)[0]
        assert solo.timings["batch_size"] == 1
        assert max_abs_diff(output.images[0], solo.images[0]) <= 1


@pytest.mark.parametrize("params, field", [
    ({"height": 66}, "height"),
    ({"max_sequence_length": 257}, "max_sequence_length"),
    ({"true_cfg_scale": 4.0}, "true_cfg_scale"),
    ({"negative_prompt": "blurry", "guidance_scale": 1.0}, "negative_prompt"),
    ({"num_frames": 5}, "num_frames"),
    ({"layers": 2}, "layers"),
])
def test_bad_params_raise_naming_the_field(ovis_omni: Omni, params: dict, field: str) -> None:
    overrides = {**BASE, **params}
    negative = overrides.pop("negative_prompt", None)
    with pytest.raises(InvalidParameterError) as error:
        ovis_omni.generate({"prompt": PROMPT, "negative_prompt": negative}, **overrides)
    assert error.value.param == field
