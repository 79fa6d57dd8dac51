"""LTX-2 image-to-video parity: ditserve's shared loop equals diffusers' own LTX2ImageToVideoPipeline on the tiny
random pipeline (the input image re-compressed, encoded once and held as the first latent frame at timestep 0),
video frames and sound track, several outputs per prompt, batched == solo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import LTX2ImageToVideoPipeline
from PIL import Image

from ditserve import Omni
from ditserve.config import OmniDiffusionSamplingParams
from ditserve.errors import InvalidParameterError
from ditserve.models.common import to_uint8_video
from ditserve.models.ltx2.image_to_video import LTX2ImageToVideoAdapter
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff
from tests.models.test_ltx2 import AUDIO_TOLERANCE, BASE, PROMPT, audio_diff
from tests.models.test_wan_i2v import random_image


@pytest.fixture(scope="module")
def diffusers_i2v() -> LTX2ImageToVideoPipeline:
    pipe = LTX2ImageToVideoPipeline.from_pretrained(tiny_pipeline_dir("ltx2_i2v"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def i2v_omni():
    omni = Omni(model=tiny_pipeline_dir("ltx2_i2v"), max_batch_size=4)
    yield omni
    omni.close()


def ours(omni: Omni, image: Image.Image, prompt: str = PROMPT, **params):
    return omni.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, **{**BASE, **params})[0]


def reference(pipe: LTX2ImageToVideoPipeline, image: Image.Image, prompt: str = PROMPT, seed: int = 0,
              fps: int = 24, **overrides) -> tuple[list[np.ndarray], np.ndarray]:
    out = pipe(image=image, prompt=prompt, frame_rate=float(fps), generator=torch.Generator("cpu").manual_seed(seed),
               output_type="np", **{**BASE, **overrides})
    return [to_uint8_video(v) for v in out.frames], out.audio.float().numpy()


@pytest.mark.parametrize("params", [{}, {"negative_prompt": "a blue dog", "fps": 12}],
                         ids=["defaults", "negative-fps-12"])
def test_matches_diffusers(i2v_omni: Omni, diffusers_i2v: LTX2ImageToVideoPipeline, params: dict) -> None:
    assert isinstance(i2v_omni.engine.adapter, LTX2ImageToVideoAdapter)
    image = random_image(1)
    out = ours(i2v_omni, image, seed=5, **params)
    videos, audio = reference(diffusers_i2v, image, seed=5, **params)
    assert out.videos[0].shape == (5, 32, 32, 3)
    assert max_abs_diff(out.videos[0], videos[0]) <= 3
    assert audio_diff(out.audio[0].samples, audio[0]) <= AUDIO_TOLERANCE


def test_several_outputs_per_prompt_match_diffusers(i2v_omni: Omni, diffusers_i2v: LTX2ImageToVideoPipeline) -> None:
    image = random_image(2)
    out = ours(i2v_omni, image, seed=3, num_outputs_per_prompt=2)
    videos, audio = reference(diffusers_i2v, image, seed=3, num_videos_per_prompt=2)
    assert len(out.videos) == len(out.audio) == 2
    assert all(max_abs_diff(a, b) <= 3 for a, b in zip(out.videos, videos, strict=True))
    assert all(audio_diff(a.samples, b) <= AUDIO_TOLERANCE for a, b in zip(out.audio, audio, strict=True))


def test_parity_oracle_detects_wrong_image_prompt_seed_and_steps(
        i2v_omni: Omni, diffusers_i2v: LTX2ImageToVideoPipeline) -> None:
    image = random_image(1)
    mine = ours(i2v_omni, image, seed=5).videos[0]
    assert max_abs_diff(mine, reference(diffusers_i2v, random_image(9), seed=5)[0][0]) > 15
    assert max_abs_diff(mine, reference(diffusers_i2v, image, prompt="a blue dog", seed=5)[0][0]) > 15
    assert max_abs_diff(mine, reference(diffusers_i2v, image, seed=6)[0][0]) > 15
    assert max_abs_diff(mine, reference(diffusers_i2v, image, seed=5, num_inference_steps=4)[0][0]) > 15


def test_batched_equals_solo(i2v_omni: Omni) -> None:
    engine = i2v_omni.engine
    prompts, images = [PROMPT, "a green triangle"], [random_image(3), random_image(4, size=(64, 64))]
    params = [OmniDiffusionSamplingParams(**BASE, seed=11, negative_prompt="blue"),
              OmniDiffusionSamplingParams(**BASE, seed=12, guidance_scale=1.0, num_outputs_per_prompt=2)]
    solo = [engine.generate([engine.make_request(p, sp, [img])])[0]
            for p, sp, img in zip(prompts, params, images, strict=True)]
    requests = [engine.make_request(p, sp, [img]) for p, sp, img in zip(prompts, params, images, strict=True)]
    batched = engine.runner.execute(requests)
    assert [o.timings["batch_size"] for o in batched] == [2, 2]
    for alone, together in zip(solo, batched, strict=True):
        assert all(max_abs_diff(a, b) <= 1 for a, b in zip(alone.videos, together.videos, strict=True))
        assert all(audio_diff(a.samples, b.samples) <= AUDIO_TOLERANCE
                   for a, b in zip(alone.audio, together.audio, strict=True))
    assert max_abs_diff(solo[0].videos[0], solo[1].videos[0]) > 15


def test_an_image_is_required(i2v_omni: Omni) -> None:
    with pytest.raises(InvalidParameterError, match="from an input image") as error:
        i2v_omni.generate(PROMPT, **BASE)
    assert error.value.param == "image"
