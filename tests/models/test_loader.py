"""Schedule settings: ``flow_shift`` for the engine (every request) or for one request replaces the scheduler's
shift (equal to diffusers' own pipeline given the same scheduler), ``boundary_ratio`` becomes the default
boundary of a two-expert model and is refused at start-up by the others."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, FluxPipeline, WanPipeline
from PIL import Image

from ditserve import Omni
from ditserve.config import OmniDiffusionConfig, OmniDiffusionSamplingParams
from ditserve.errors import InvalidParameterError
from ditserve.models.common import scheduler_with_flow_shift
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff

PROMPT = "a small red circle at the top left"
FLUX_BASE = {"height": 64, "width": 64, "num_inference_steps": 4, "max_sequence_length": 64}
WAN_BASE = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 4, "max_sequence_length": 32}


@pytest.fixture(scope="module")
def shifted_reference(tiny_flux_dir: str) -> Image.Image:
    """diffusers' FluxPipeline with a fixed shift of 3 instead of its resolution-dependent one."""
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=3.0, use_dynamic_shifting=False)
    return pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(3), **FLUX_BASE).images[0]


def test_flow_shift_on_flux_equals_diffusers_with_that_fixed_shift(tiny_flux_dir: str, flux_omni: Omni,
                                                                    shifted_reference: Image.Image) -> None:
    with Omni(model=tiny_flux_dir, flow_shift=3.0) as shifted:
        ours = shifted.generate(PROMPT, seed=3, **FLUX_BASE)[0].images[0]
    assert max_abs_diff(ours, shifted_reference) <= 3
    # the oracle sees the shift: the resolution-dependent default gives another image
    assert max_abs_diff(flux_omni.generate(PROMPT, seed=3, **FLUX_BASE)[0].images[0], shifted_reference) > 15


def test_a_requests_own_flow_shift_equals_diffusers_and_leaves_its_batch_mate_alone(
        flux_omni: Omni, shifted_reference: Image.Image) -> None:
    plain_solo = flux_omni.generate("a blue square", seed=4, **FLUX_BASE)[0].images[0]
    shifted, plain = flux_omni.generate([PROMPT, "a blue square"],
                                        [OmniDiffusionSamplingParams(seed=3, flow_shift=3.0, **FLUX_BASE),
                                         OmniDiffusionSamplingParams(seed=4, **FLUX_BASE)])
    assert shifted.timings["batch_size"] == plain.timings["batch_size"] == 2
    assert max_abs_diff(shifted.images[0], shifted_reference) <= 3
    assert max_abs_diff(plain.images[0], plain_solo) <= 1


def test_flow_shift_on_wan_sets_unipc_flow_shift_and_equals_diffusers() -> None:
    folder = tiny_pipeline_dir("wan")
    pipe = WanPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=7.0)
    reference = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(1), output_type="np", **WAN_BASE).frames[0]
    with Omni(model=folder, flow_shift=7.0) as shifted:
        assert shifted.engine.adapter.pipeline.scheduler.config.flow_shift == 7.0
        ours = shifted.generate(PROMPT, seed=1, **WAN_BASE)[0].videos[0]
    assert abs(ours.astype(float) - (reference * 255).round()).max() <= 3


def test_a_scheduler_without_a_shift_is_refused_by_name() -> None:
    with pytest.raises(InvalidParameterError, match="DDIMScheduler") as error:
        scheduler_with_flow_shift(DDIMScheduler(), 2.0)
    assert error.value.param == "flow_shift"


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_bad_flow_shift_is_refused_before_loading(value: float) -> None:
    with pytest.raises(InvalidParameterError) as error:
        OmniDiffusionConfig(model="unused", flow_shift=value)
    assert error.value.param == "flow_shift"


def test_boundary_ratio_is_the_two_expert_default_and_requests_keep_their_own() -> None:
    with Omni(model=tiny_pipeline_dir("wan_a14b"), boundary_ratio=0.5) as omni:
        adapter = omni.engine.adapter
        assert adapter.resolve_params(OmniDiffusionSamplingParams()).boundary_ratio == 0.5
        assert adapter.resolve_params(OmniDiffusionSamplingParams(boundary_ratio=0.9)).boundary_ratio == 0.9


def test_boundary_ratio_on_a_model_without_a_second_expert_fails_at_start(tiny_flux_dir: str) -> None:
    with pytest.raises(InvalidParameterError) as error:
        Omni(model=tiny_flux_dir, boundary_ratio=1.0)
    assert error.value.param == "boundary_ratio"
