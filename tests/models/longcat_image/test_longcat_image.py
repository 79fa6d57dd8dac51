"""LongCat-Image parity: ditserve's shared loop equals diffusers' own LongCatImagePipeline on the same weights and
seed, with its prompt rewriting and its CFG renorm.

With the tiny random text encoder the rewritten prompt does not depend on the prompt (its long system message
drowns the prompt out), so the checks that a wrong prompt shows run without rewriting, on a copy of the tiny
pipeline whose ``ditserve_defaults.json`` turns it off; the rewriting itself is checked against diffusers' with it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import LongCatImagePipeline
from PIL import Image

from ditserve import Omni, OmniDiffusionSamplingParams
from ditserve.errors import InvalidParameterError, InvalidTypeError
from ditserve.models.longcat_image.adapter import LongCatImageAdapter, LongCatOptions, renormalized_cfg
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.common import folder_with_defaults
from ditserve.testing.compare import max_abs_diff

PROMPT = "a small red circle at the top left"
BASE = {"height": 64, "width": 64, "num_inference_steps": 3}
NO_REWRITE = {"enable_prompt_rewrite": False}


@pytest.fixture(scope="module")
def folder() -> str:
    return tiny_pipeline_dir("longcat_image")


@pytest.fixture(scope="module")
def plain_folder(folder: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny pipeline with prompt rewriting off."""
    return folder_with_defaults(folder, tmp_path_factory.mktemp("longcat") / "plain", NO_REWRITE)


@pytest.fixture(scope="module")
def diffusers_longcat(folder: str) -> LongCatImagePipeline:
    pipe = LongCatImagePipeline.from_pretrained(folder, **LongCatImageAdapter.preloaded_components(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def omni(plain_folder: str):
    omni = Omni(model=plain_folder, max_batch_size=4)
    yield omni
    omni.close()


def reference(pipe: LongCatImagePipeline, prompt: str = PROMPT, seed: int = 0, **overrides) -> list[Image.Image]:
    kwargs = {**BASE, **NO_REWRITE, **overrides}
    return pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images


def ours(omni: Omni, prompt: str = PROMPT, seed: int = 0, **overrides) -> list[Image.Image]:
    params = {**BASE, **overrides}
    negative = params.pop("negative_prompt", None)
    return omni.generate({"prompt": prompt, "negative_prompt": negative}, seed=seed, **params)[0].images


def test_prompt_rewriting_matches_diffusers(folder: str, diffusers_longcat: LongCatImagePipeline) -> None:
    with Omni(model=folder) as rewriting:
        image = ours(rewriting, seed=4)[0]
    assert max_abs_diff(image, reference(diffusers_longcat, seed=4, enable_prompt_rewrite=True)[0]) <= 3
    # the rewriting changes the image: a loop that skipped it would fail the check above
    assert max_abs_diff(image, reference(diffusers_longcat, seed=4)[0]) > 10


@pytest.mark.parametrize("guidance", [{}, {"negative_prompt": "blue", "guidance_scale": 3.0},
                                      {"guidance_scale": 1.0}], ids=["cfg-renorm", "negative", "no-cfg"])
def test_matches_diffusers(omni: Omni, diffusers_longcat: LongCatImagePipeline, guidance: dict) -> None:
    assert max_abs_diff(ours(omni, seed=7, **guidance)[0], reference(diffusers_longcat, seed=7, **guidance)[0]) <= 3


def test_parity_oracle_detects_wrong_prompt_seed_and_steps(omni: Omni,
                                                           diffusers_longcat: LongCatImagePipeline) -> None:
    image = ours(omni, seed=7)[0]
    assert max_abs_diff(image, reference(diffusers_longcat, prompt="a blue dog", seed=7)[0]) > 10
    assert max_abs_diff(image, reference(diffusers_longcat, seed=8)[0]) > 10
    assert max_abs_diff(image, reference(diffusers_longcat, seed=7, num_inference_steps=4)[0]) > 10


def test_several_outputs_per_prompt_match_diffusers(omni: Omni, diffusers_longcat: LongCatImagePipeline) -> None:
    mine = ours(omni, seed=3, num_outputs_per_prompt=2)
    theirs = reference(diffusers_longcat, seed=3, num_images_per_prompt=2)
    assert len(mine) == 2 and max_abs_diff(mine[0], mine[1]) > 10
    assert all(max_abs_diff(a, b) <= 3 for a, b in zip(mine, theirs, strict=True))


@pytest.mark.parametrize("options", [{"enable_cfg_renorm": False}, {"cfg_renorm_min": 0.9}],
                         ids=["renorm-off", "renorm-floor"])
def test_cfg_renorm_options_from_the_model_folder(folder: str, diffusers_longcat: LongCatImagePipeline,
                                                  tmp_path: Path, options: dict) -> None:
    with Omni(model=folder_with_defaults(folder, tmp_path / "options", {**NO_REWRITE, **options})) as omni:
        image = ours(omni, seed=5, guidance_scale=8.0)[0]
    assert max_abs_diff(image, reference(diffusers_longcat, seed=5, guidance_scale=8.0, **options)[0]) <= 3
    # the option changed the image: the default renorm would fail the check above
    assert max_abs_diff(image, reference(diffusers_longcat, seed=5, guidance_scale=8.0)[0]) > 10


@pytest.mark.parametrize(("options", "error_type", "field"), [
    ({"enable_prompt_rewrite": "yes"}, InvalidTypeError, "enable_prompt_rewrite"),
    ({"cfg_renorm_min": 1.5}, InvalidParameterError, "cfg_renorm_min"),
    ({"cfg_renorm_min": True}, InvalidTypeError, "cfg_renorm_min")])
def test_bad_option_in_the_model_folder_names_it(options: dict, error_type: type, field: str) -> None:
    with pytest.raises(error_type) as error:
        LongCatOptions.take_from(dict(options))
    assert error.value.param == field


def test_options_leave_the_sampling_defaults() -> None:
    defaults = {"enable_cfg_renorm": False, "num_inference_steps": 20}
    assert LongCatOptions.take_from(defaults) == LongCatOptions(enable_cfg_renorm=False)
    assert defaults == {"num_inference_steps": 20}


def test_batch_of_different_prompts_seeds_guidance_and_steps_equals_solo(omni: Omni) -> None:
    requests = [{"prompt": "a cat"}, {"prompt": "a large blue square", "negative_prompt": "red"},
                {"prompt": "a green triangle"}]
    params = [{**BASE, "seed": 1}, {**BASE, "seed": 2, "guidance_scale": 2.5, "num_inference_steps": 5},
              {**BASE, "seed": 3, "guidance_scale": 1.0, "num_inference_steps": 2}]
    batch = omni.generate(requests, params)
    assert [o.timings["batch_size"] for o in batch] == [3, 3, 3]
    for output, request, request_params in zip(batch, requests, params, strict=True):
        solo = omni.generate(request, request_params)[0]
        assert solo.timings["batch_size"] == 1
        assert max_abs_diff(output.images[0], solo.images[0]) <= 1


def test_renormalized_cfg_only_shrinks_towards_the_conditional_norm() -> None:
    generator = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 6, 8, generator=generator), torch.randn(2, 6, 8, generator=generator)
    plain = uncond + 5.0 * (cond - uncond)
    renormed = renormalized_cfg(cond, uncond, 5.0, floor=0.0)
    assert (renormed.norm(dim=-1) <= cond.norm(dim=-1) * (1 + 1e-5)).all()
    assert (renormed.norm(dim=-1) <= plain.norm(dim=-1) * (1 + 1e-5)).all()
    torch.testing.assert_close(renormed / renormed.norm(dim=-1, keepdim=True),
                               plain / plain.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(renormalized_cfg(cond, uncond, 5.0, floor=1.0), plain)


def test_prompt_cache_key_follows_text_guidance_and_rewriting(omni: Omni, folder: str) -> None:
    def key(engine, prompt: str = PROMPT, **overrides) -> tuple:
        request = engine.make_request(prompt, OmniDiffusionSamplingParams(**{**BASE, **overrides}))
        return engine.adapter.prompt_cache_key(request)

    engine = omni.engine
    assert key(engine, seed=1) == key(engine, seed=2)
    assert key(engine) != key(engine, "a blue dog")
    assert key(engine) != key(engine, negative_prompt="red")
    assert key(engine) != key(engine, guidance_scale=1.0)
    with Omni(model=folder) as rewriting:
        assert key(rewriting.engine) != key(engine)
        # a rewriting that samples gives another prompt each time: its embedding must not be cached
        generation = rewriting.engine.adapter.pipeline.text_encoder.generation_config
        assert key(rewriting.engine) is not None
        generation.do_sample, generation.top_k = True, 50
        assert key(rewriting.engine) is None
        generation.top_k = 1  # sampling from the single most likely token is greedy decoding
        assert key(rewriting.engine) is not None


@pytest.mark.parametrize(("params", "field"), [
    ({"height": 68}, "height"),
    ({"max_sequence_length": 256}, "max_sequence_length"),
    ({"true_cfg_scale": 4.0}, "true_cfg_scale"),
    ({"negative_prompt": "blurry", "guidance_scale": 1.0}, "negative_prompt"),
    ({"num_frames": 5}, "num_frames"),
])
def test_bad_params_raise_naming_the_field(omni: Omni, params: dict, field: str) -> None:
    with pytest.raises(InvalidParameterError) as error:
        omni.generate(PROMPT, **{**BASE, **params})
    assert error.value.param == field


def test_input_image_is_refused(omni: Omni) -> None:
    with pytest.raises(InvalidParameterError) as error:
        omni.generate({"prompt": PROMPT, "multi_modal_data": {"image": Image.new("RGB", (64, 64))}}, **BASE)
    assert error.value.param == "image"
