"""Z-Image parity: ditserve's shared loop equals diffusers' own ZImagePipeline on the same weights and seed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import ZImagePipeline

from ditserve import Omni
from ditserve.config import OmniDiffusionSamplingParams
from ditserve.errors import InvalidParameterError, InvalidTypeError
from ditserve.models.z_image.adapter import ZImageAdapter
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.common import folder_with_defaults
from ditserve.testing.compare import max_abs_diff

PROMPT = "a small red circle at the top left"
BASE = {"height": 64, "width": 64, "num_inference_steps": 3, "max_sequence_length": 64}


@pytest.fixture(scope="module")
def z_image_dir() -> str:
    return tiny_pipeline_dir("z_image")


@pytest.fixture(scope="module")
def diffusers_z_image(z_image_dir: str) -> ZImagePipeline:
    pipe = ZImagePipeline.from_pretrained(z_image_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def z_image_omni(z_image_dir: str):
    omni = Omni(model=z_image_dir, max_batch_size=4)
    yield omni
    omni.close()


def reference(pipe: ZImagePipeline, prompt: str = PROMPT, seed: int = 0, **overrides):
    kwargs = {**BASE, **overrides}
    return pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images


def test_uses_the_z_image_adapter(z_image_omni: Omni) -> None:
    assert isinstance(z_image_omni.engine.adapter, ZImageAdapter)


@pytest.mark.parametrize("guidance", [{}, {"negative_prompt": "a blue dog"}, {"guidance_scale": 0.0}],
                         ids=["cfg-default", "cfg-negative", "no-cfg"])
def test_matches_diffusers(z_image_omni: Omni, diffusers_z_image: ZImagePipeline, guidance: dict) -> None:
    ours = z_image_omni.generate(PROMPT, seed=5, **BASE, **guidance)[0].images[0]
    assert max_abs_diff(ours, reference(diffusers_z_image, seed=5, **guidance)[0]) <= 3


def test_parity_oracle_detects_wrong_prompt_seed_and_steps(z_image_omni: Omni,
                                                           diffusers_z_image: ZImagePipeline) -> None:
    ours = z_image_omni.generate(PROMPT, seed=5, **BASE)[0].images[0]
    assert max_abs_diff(ours, reference(diffusers_z_image, prompt="a blue dog", seed=5)[0]) > 15
    assert max_abs_diff(ours, reference(diffusers_z_image, seed=6)[0]) > 15
    assert max_abs_diff(ours, reference(diffusers_z_image, seed=5, num_inference_steps=4)[0]) > 15


def test_several_outputs_per_prompt_match_diffusers(z_image_omni: Omni, diffusers_z_image: ZImagePipeline) -> None:
    ours = z_image_omni.generate(PROMPT, seed=3, num_outputs_per_prompt=2, **BASE)[0].images
    theirs = reference(diffusers_z_image, seed=3, num_images_per_prompt=2)
    assert len(ours) == 2
    assert all(max_abs_diff(a, b) <= 3 for a, b in zip(ours, theirs, strict=True))


def test_batched_equals_solo(z_image_omni: Omni) -> None:
    # captions of different lengths in one batch: the transformer gets one caption tensor per row
    prompts = [PROMPT, "a green triangle"]
    params = [OmniDiffusionSamplingParams(**BASE, seed=11, negative_prompt="blue"),
              OmniDiffusionSamplingParams(**BASE, seed=12, negative_prompt="a red square at the bottom")]
    solo = [z_image_omni.generate(p, sp)[0].images[0] for p, sp in zip(prompts, params, strict=True)]
    through_generate = z_image_omni.generate(prompts, params)
    # straight to the runner: the two requests certainly share one batch
    requests = [z_image_omni.engine.make_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    one_batch = z_image_omni.engine.runner.execute(requests)
    assert [o.timings["batch_size"] for o in one_batch] == [2, 2]
    for alone, generated, batched in zip(solo, through_generate, one_batch, strict=True):
        assert max_abs_diff(alone, generated.images[0]) <= 1
        assert max_abs_diff(alone, batched.images[0]) <= 1
    assert max_abs_diff(solo[0], solo[1]) > 15


def test_cfg_truncation_and_normalization_from_the_model_folder(
        z_image_dir: str, diffusers_z_image: ZImagePipeline, tmp_path: Path) -> None:
    options = {"cfg_truncation": 0.2, "cfg_normalization": 1.0}
    folder = folder_with_defaults(z_image_dir, tmp_path / "z_image_cfg", options)
    with Omni(model=folder) as omni:
        ours = omni.generate(PROMPT, seed=5, **BASE)[0].images[0]
    assert max_abs_diff(ours, reference(diffusers_z_image, seed=5, **options)[0]) <= 3
    assert max_abs_diff(ours, reference(diffusers_z_image, seed=5)[0]) > 3


def test_bad_cfg_option_in_the_model_folder_is_an_error(z_image_dir: str, tmp_path: Path) -> None:
    folder = folder_with_defaults(z_image_dir, tmp_path / "z_image_bad", {"cfg_truncation": "half"})
    with pytest.raises(InvalidTypeError) as error:
        Omni(model=folder)
    assert error.value.param == "cfg_truncation"


@pytest.mark.parametrize(("bad", "param"), [
    ({"height": 66}, "height"),
    ({"true_cfg_scale": 4.0}, "true_cfg_scale"),
    ({"boundary_ratio": 0.5}, "boundary_ratio"),
    ({"num_frames": 5}, "num_frames"),
    ({"guidance_scale": 0.0, "negative_prompt": "blurry"}, "negative_prompt"),
])
def test_bad_input_names_its_field(z_image_omni: Omni, bad: dict, param: str) -> None:
    with pytest.raises(InvalidParameterError) as error:
        z_image_omni.generate(PROMPT, **{**BASE, **bad})
    assert error.value.param == param
