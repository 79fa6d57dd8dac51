"""LTX-2 text-to-video parity: ditserve's shared loop equals diffusers' own LTX2Pipeline on tiny random pipelines
(video frames and the sound track). On the one that reaches diffusers' default STG block (28) every guidance pass
diffusers runs by default runs, the perturbed one included; on the 2-block one, which lacks it, the STG pass is
skipped and the output is still diffusers'. ``fps`` reaches it as ``frame_rate``, several outputs per prompt,
batched == solo."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from diffusers import LTX2Pipeline

from ditserve import Omni
from ditserve.config import OmniDiffusionSamplingParams
from ditserve.errors import InvalidParameterError
from ditserve.forward_context import current_forward_context
from ditserve.models.common import to_uint8_video
from ditserve.models.ltx2.adapter import Branch, LTX2Adapter
from ditserve.request import RequestOutput
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff

PROMPT = "a small red circle at the top left"
BASE = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 3, "max_sequence_length": 32}
#: float rounding between diffusers' batch of guidance passes and ours
AUDIO_TOLERANCE = 1e-5


def diffusers_pipeline(model: str) -> LTX2Pipeline:
    pipe = LTX2Pipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def diffusers_ltx2() -> LTX2Pipeline:
    return diffusers_pipeline(tiny_pipeline_dir("ltx2"))


def reference(pipe: LTX2Pipeline, prompt: str = PROMPT, seed: int = 0, fps: int = 24,
              **overrides) -> tuple[list[np.ndarray], np.ndarray]:
    kwargs = {**BASE, **overrides}
    out = pipe(prompt=prompt, frame_rate=float(fps), generator=torch.Generator("cpu").manual_seed(seed),
               output_type="np", **kwargs)
    return [to_uint8_video(v) for v in out.frames], out.audio.float().numpy()


def audio_diff(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape
    return float(np.abs(ours - theirs).max())


def generate_counting_branches(omni: Omni, **params) -> tuple[RequestOutput, Counter[str]]:
    """One output of ``PROMPT``, and how many transformer calls each guidance branch made."""
    transformer = omni.engine.runner.model.pipeline.transformer
    branches: Counter[str] = Counter()
    handle = transformer.register_forward_pre_hook(lambda *_: branches.update([current_forward_context().branch]))
    try:
        out = omni.generate(PROMPT, **params)[0]
    finally:
        handle.remove()
    return out, branches


def test_the_default_stg_pass_runs_and_matches_diffusers() -> None:
    """The 29-block transformer has perturbed attention and diffusers' default STG block (28): the STG pass perturbs,
    so it runs every step, and so do the unconditional and the modality-isolation passes; the output is diffusers',
    and not diffusers' without the STG term."""
    model = tiny_pipeline_dir("ltx2_stg")
    with Omni(model=model) as omni:
        assert omni.engine.adapter.stg_perturbs
        out, branches = generate_counting_branches(omni, seed=5, **BASE)
    assert branches == {branch.value: BASE["num_inference_steps"] for branch in Branch}
    pipe = diffusers_pipeline(model)
    videos, audio = reference(pipe, seed=5)
    assert max_abs_diff(out.videos[0], videos[0]) <= 3
    assert audio_diff(out.audio[0].samples, audio[0]) <= AUDIO_TOLERANCE
    # the perturbed block is the last one: the term moves the video by a few /255 at most, the audio by ~3e-4
    _, audio = reference(pipe, seed=5, stg_scale=0.0, audio_stg_scale=0.0)
    assert audio_diff(out.audio[0].samples, audio[0]) > 10 * AUDIO_TOLERANCE


def test_without_the_stg_block_the_stg_pass_is_skipped_and_matches_diffusers(
        ltx2_omni: Omni, diffusers_ltx2: LTX2Pipeline) -> None:
    """The 2-block transformer lacks diffusers' default STG block: the STG pass would equal the conditional one, so
    it does not run, while diffusers runs it; the unconditional pass runs with the video's guidance off (the audio's
    guidance scale is 7), and modality isolation runs."""
    assert not ltx2_omni.engine.adapter.stg_perturbs
    out, branches = generate_counting_branches(ltx2_omni, seed=5, guidance_scale=1.0, **BASE)
    assert branches == {branch.value: BASE["num_inference_steps"] for branch in Branch if branch is not Branch.STG}
    videos, audio = reference(diffusers_ltx2, seed=5, guidance_scale=1.0)
    assert max_abs_diff(out.videos[0], videos[0]) <= 3
    assert audio_diff(out.audio[0].samples, audio[0]) <= AUDIO_TOLERANCE


def test_output_is_a_video_with_its_sound_track(ltx2_omni: Omni) -> None:
    assert isinstance(ltx2_omni.engine.adapter, LTX2Adapter)
    out = ltx2_omni.generate(PROMPT, seed=1, **BASE)[0]
    (video,) = out.videos
    assert video.shape == (5, 32, 32, 3) and video.dtype == np.uint8
    (track,) = out.audio
    assert track.samples.shape[0] == 2 and track.samples.shape[1] > 0  # the tiny vocoder is stereo
    assert track.sample_rate == ltx2_omni.engine.runner.model.pipeline.vocoder.config.output_sampling_rate
    assert out.fps == 24  # diffusers' frame_rate default


@pytest.mark.parametrize("params", [{}, {"negative_prompt": "a blue dog"}, {"fps": 12}],
                         ids=["defaults", "negative", "fps-12"])
def test_matches_diffusers(ltx2_omni: Omni, diffusers_ltx2: LTX2Pipeline, params: dict) -> None:
    out = ltx2_omni.generate(PROMPT, seed=5, **{**BASE, **params})[0]
    fps = params.pop("fps", 24)
    videos, audio = reference(diffusers_ltx2, seed=5, fps=fps, **params)
    assert max_abs_diff(out.videos[0], videos[0]) <= 3
    assert audio_diff(out.audio[0].samples, audio[0]) <= AUDIO_TOLERANCE


def test_fps_is_the_pipelines_frame_rate(ltx2_omni: Omni, diffusers_ltx2: LTX2Pipeline) -> None:
    """The audio lasts num_frames / fps seconds and the video's positional embeddings follow the frame rate."""
    at_24, at_12 = (ltx2_omni.generate(PROMPT, seed=5, fps=fps, **BASE)[0] for fps in (24, 12))
    assert at_12.fps == 12
    assert at_12.audio[0].samples.shape[1] > at_24.audio[0].samples.shape[1]
    assert max_abs_diff(at_12.videos[0], at_24.videos[0]) > 3
    # diffusers at its default frame rate is the 24 fps output, not the 12 fps one
    videos, _ = reference(diffusers_ltx2, seed=5)
    assert max_abs_diff(at_12.videos[0], videos[0]) > 3


def test_several_outputs_per_prompt_match_diffusers(ltx2_omni: Omni, diffusers_ltx2: LTX2Pipeline) -> None:
    out = ltx2_omni.generate(PROMPT, seed=3, num_outputs_per_prompt=2, **BASE)[0]
    videos, audio = reference(diffusers_ltx2, seed=3, num_videos_per_prompt=2)
    assert len(out.videos) == len(out.audio) == 2
    assert all(max_abs_diff(a, b) <= 3 for a, b in zip(out.videos, videos, strict=True))
    assert all(audio_diff(a.samples, b) <= AUDIO_TOLERANCE for a, b in zip(out.audio, audio, strict=True))
    assert max_abs_diff(out.videos[0], out.videos[1]) > 15


def test_parity_oracle_detects_wrong_prompt_seed_and_steps(ltx2_omni: Omni, diffusers_ltx2: LTX2Pipeline) -> None:
    out = ltx2_omni.generate(PROMPT, seed=5, **BASE)[0]
    for wrong in ({"prompt": "a blue dog"}, {"seed": 6}, {"num_inference_steps": 4}):
        videos, audio = reference(diffusers_ltx2, **{"seed": 5, **wrong})
        assert max_abs_diff(out.videos[0], videos[0]) > 15
        assert audio_diff(out.audio[0].samples, audio[0]) > 100 * AUDIO_TOLERANCE


def test_batched_equals_solo(ltx2_omni: Omni) -> None:
    prompts = [PROMPT, "a green triangle"]
    params = [OmniDiffusionSamplingParams(**BASE, seed=11, negative_prompt="blue"),
              OmniDiffusionSamplingParams(**{**BASE, "num_inference_steps": 4}, seed=12, guidance_scale=1.5,
                                          num_outputs_per_prompt=2)]
    engine = ltx2_omni.engine
    solo = [engine.generate([engine.make_request(p, sp)])[0] for p, sp in zip(prompts, params, strict=True)]
    batched = engine.runner.execute([engine.make_request(p, sp) for p, sp in zip(prompts, params, strict=True)])
    assert [o.timings["batch_size"] for o in batched] == [2, 2]
    for alone, together in zip(solo, batched, strict=True):
        assert len(alone.videos) == len(together.videos)
        assert all(max_abs_diff(a, b) <= 1 for a, b in zip(alone.videos, together.videos, strict=True))
        assert all(audio_diff(a.samples, b.samples) <= AUDIO_TOLERANCE
                   for a, b in zip(alone.audio, together.audio, strict=True))
    assert max_abs_diff(solo[0].videos[0], solo[1].videos[0]) > 15


def test_requests_of_other_frame_rates_do_not_share_a_step(ltx2_omni: Omni) -> None:
    adapter = ltx2_omni.engine.adapter
    at = [ltx2_omni.engine.make_request(PROMPT, OmniDiffusionSamplingParams(**BASE, fps=fps)) for fps in (24, 12)]
    assert adapter.step_key(at[0]) != adapter.step_key(at[1])


@pytest.mark.parametrize("params, field", [({"num_frames": 6}, "num_frames"), ({"height": 48}, "height"),
                                           ({"guidance_scale_2": 2.0}, "guidance_scale_2")])
def test_bad_params_are_refused(ltx2_omni: Omni, params: dict, field: str) -> None:
    with pytest.raises(InvalidParameterError) as error:
        ltx2_omni.generate(PROMPT, **{**BASE, **params})
    assert error.value.param == field
