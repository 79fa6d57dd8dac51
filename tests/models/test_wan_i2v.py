"""Wan2.2 image-to-video parity: ditserve's shared loop equals diffusers' own WanImageToVideoPipeline on the tiny
I2V-A14B layout (two experts, the first frame's latents as the condition) and the tiny TI2V-5B layout (48-channel
VAE, the first latent frame held at the image's latents with timestep 0), with batched == solo."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from diffusers import WanImageToVideoPipeline
from PIL import Image

from ditserve import Omni
from ditserve.config import OmniDiffusionSamplingParams
from ditserve.errors import InvalidParameterError, UnsupportedModelError
from ditserve.models.common import to_uint8_video
from ditserve.models.wan.image_to_video import WanImageToVideoAdapter
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff

PROMPT = "a small red circle at the top left"
#: 4 steps: with the tiny A14B's boundary, two steps run on each expert
BASE = {"height": 32, "width": 32, "num_frames": 5, "num_inference_steps": 4, "max_sequence_length": 32}


def random_image(seed: int, size: tuple[int, int] = (40, 48)) -> Image.Image:
    """An input image of another size than the output: the pipeline resizes it to the output size."""
    width, height = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def load_diffusers() -> WanImageToVideoPipeline:
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_pipeline_dir("wan_i2v_a14b"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def diffusers_i2v() -> WanImageToVideoPipeline:
    return load_diffusers()


@pytest.fixture(scope="module")
def i2v_omni():
    omni = Omni(model=tiny_pipeline_dir("wan_i2v_a14b"), max_batch_size=4)
    yield omni
    omni.close()


def ours(omni: Omni, image: Image.Image, prompt: str = PROMPT, **params) -> list[np.ndarray]:
    return omni.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, **{**BASE, **params})[0].videos


def reference(pipe: WanImageToVideoPipeline, image: Image.Image, prompt: str = PROMPT, seed: int = 0,
              **overrides) -> list[np.ndarray]:
    kwargs = {**BASE, **overrides}
    frames = pipe(image=image, prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).frames
    return [to_uint8_video(video) for video in frames]


def test_output_is_a_uint8_video(i2v_omni: Omni) -> None:
    assert isinstance(i2v_omni.engine.adapter, WanImageToVideoAdapter)
    (video,) = ours(i2v_omni, random_image(0), seed=1)
    assert video.shape == (5, 32, 32, 3) and video.dtype == np.uint8


@pytest.mark.parametrize("guidance", [{}, {"guidance_scale_2": 2.0}, {"negative_prompt": "a blue dog"},
                                      {"guidance_scale": 1.0}],
                         ids=["same-guidance", "guidance-2", "negative", "no-cfg"])
def test_matches_diffusers(i2v_omni: Omni, diffusers_i2v: WanImageToVideoPipeline, guidance: dict) -> None:
    image = random_image(1)
    mine = ours(i2v_omni, image, seed=5, **guidance)[0]
    assert max_abs_diff(mine, reference(diffusers_i2v, image, seed=5, **guidance)[0]) <= 3


def test_boundary_ratio_per_request_matches_diffusers_config(i2v_omni: Omni) -> None:
    pipe = load_diffusers()
    pipe.register_to_config(boundary_ratio=0.6)
    image = random_image(1)
    mine = ours(i2v_omni, image, seed=5, boundary_ratio=0.6)[0]
    assert max_abs_diff(mine, reference(pipe, image, seed=5)[0]) <= 3
    assert max_abs_diff(mine, ours(i2v_omni, image, seed=5)[0]) > 3


def test_several_outputs_per_prompt_match_diffusers(i2v_omni: Omni, diffusers_i2v: WanImageToVideoPipeline) -> None:
    image = random_image(2)
    mine = ours(i2v_omni, image, seed=3, num_outputs_per_prompt=2)
    theirs = reference(diffusers_i2v, image, seed=3, num_videos_per_prompt=2)
    assert len(mine) == 2
    assert all(max_abs_diff(a, b) <= 3 for a, b in zip(mine, theirs, strict=True))


def test_parity_oracle_detects_wrong_image_prompt_seed_and_steps(
        i2v_omni: Omni, diffusers_i2v: WanImageToVideoPipeline) -> None:
    image = random_image(1)
    mine = ours(i2v_omni, image, seed=5)[0]
    assert max_abs_diff(mine, reference(diffusers_i2v, random_image(9), seed=5)[0]) > 15
    assert max_abs_diff(mine, reference(diffusers_i2v, image, prompt="a blue dog", seed=5)[0]) > 15
    assert max_abs_diff(mine, reference(diffusers_i2v, image, seed=6)[0]) > 15
    assert max_abs_diff(mine, reference(diffusers_i2v, image, seed=5, num_inference_steps=5)[0]) > 15


def test_the_first_frame_is_encoded_once_per_request(i2v_omni: Omni) -> None:
    vae = i2v_omni.engine.runner.model.pipeline.vae
    calls: Counter[str] = Counter()
    handle = vae.encoder.register_forward_pre_hook(lambda *_: calls.update(["encode"]))
    try:
        ours(i2v_omni, random_image(0), seed=1, num_outputs_per_prompt=2)
    finally:
        handle.remove()
    # the causal VAE encoder runs once per chunk of frames (1 + 4 for 5 frames): one encoding, two chunks
    assert calls["encode"] == 2


def test_batched_equals_solo(i2v_omni: Omni) -> None:
    prompts, images = [PROMPT, "a green triangle"], [random_image(3), random_image(4, size=(64, 64))]
    params = [OmniDiffusionSamplingParams(**BASE, seed=11, negative_prompt="blue"),
              OmniDiffusionSamplingParams(**BASE, seed=12, guidance_scale=3.0, guidance_scale_2=1.5)]
    engine = i2v_omni.engine
    solo = [engine.generate([engine.make_request(p, sp, [img])])[0].videos[0]
            for p, sp, img in zip(prompts, params, images, strict=True)]
    requests = [engine.make_request(p, sp, [img]) for p, sp, img in zip(prompts, params, images, strict=True)]
    one_batch = engine.runner.execute(requests)
    assert [o.timings["batch_size"] for o in one_batch] == [2, 2]
    for alone, batched in zip(solo, one_batch, strict=True):
        assert max_abs_diff(alone, batched.videos[0]) <= 1
    assert max_abs_diff(solo[0], solo[1]) > 15


def test_an_image_is_required(i2v_omni: Omni) -> None:
    with pytest.raises(InvalidParameterError, match="from an input image") as error:
        i2v_omni.generate(PROMPT, **BASE)
    assert error.value.param == "image"


def test_wan21_image_to_video_with_an_image_encoder_is_refused_at_load() -> None:
    pipe = load_diffusers()
    # Wan2.1 I2V's transformer reads CLIP image embeddings (image_dim), which the adapter does not compute
    pipe.transformer.register_to_config(image_dim=32)
    with pytest.raises(UnsupportedModelError, match="Wan2.1 I2V") as error:
        WanImageToVideoAdapter(pipe)
    assert error.value.param == "model"


def test_one_image_at_most(i2v_omni: Omni) -> None:
    with pytest.raises(InvalidParameterError) as error:
        i2v_omni.generate({"prompt": PROMPT, "multi_modal_data": {"image": [random_image(0), random_image(1)]}},
                          **BASE)
    assert error.value.param == "image"


# ---------------------------------------------------------------------- Wan2.2 TI2V-5B with an input image
#: the 48-channel VAE is 16x in space: 64x64 makes 2x2 tokens per latent frame
TI2V = {**BASE, "height": 64, "width": 64}


@pytest.fixture(scope="module")
def ti2v_omni():
    omni = Omni(model=tiny_pipeline_dir("wan_ti2v_i2v"), max_batch_size=4)
    yield omni
    omni.close()


@pytest.fixture(scope="module")
def diffusers_ti2v() -> WanImageToVideoPipeline:
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_pipeline_dir("wan_ti2v_i2v"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", [{}, {"negative_prompt": "a blue dog"}, {"guidance_scale": 1.0}],
                         ids=["cfg", "negative", "no-cfg"])
def test_ti2v_matches_diffusers(ti2v_omni: Omni, diffusers_ti2v: WanImageToVideoPipeline, guidance: dict) -> None:
    assert ti2v_omni.engine.runner.model.pipeline.config.expand_timesteps
    image = random_image(1)
    mine = ours(ti2v_omni, image, seed=5, **TI2V, **guidance)[0]
    assert mine.shape == (5, 64, 64, 3)
    assert max_abs_diff(mine, reference(diffusers_ti2v, image, seed=5, **TI2V, **guidance)[0]) <= 3


def test_ti2v_parity_oracle_detects_wrong_image_prompt_seed_and_steps(
        ti2v_omni: Omni, diffusers_ti2v: WanImageToVideoPipeline) -> None:
    image = random_image(1)
    mine = ours(ti2v_omni, image, seed=5, **TI2V)[0]
    assert max_abs_diff(mine, reference(diffusers_ti2v, random_image(9), seed=5, **TI2V)[0]) > 15
    assert max_abs_diff(mine, reference(diffusers_ti2v, image, prompt="a blue dog", seed=5, **TI2V)[0]) > 15
    assert max_abs_diff(mine, reference(diffusers_ti2v, image, seed=6, **TI2V)[0]) > 15
    assert max_abs_diff(mine, reference(diffusers_ti2v, image, seed=5, **{**TI2V, "num_inference_steps": 5})[0]) > 15


def test_ti2v_batched_equals_solo(ti2v_omni: Omni) -> None:
    engine = ti2v_omni.engine
    prompts, images = [PROMPT, "a green triangle"], [random_image(3), random_image(4, size=(64, 64))]
    params = [OmniDiffusionSamplingParams(**TI2V, seed=11, negative_prompt="blue"),
              OmniDiffusionSamplingParams(**TI2V, seed=12, guidance_scale=1.0, num_outputs_per_prompt=2)]
    solo = [engine.generate([engine.make_request(p, sp, [img])])[0].videos
            for p, sp, img in zip(prompts, params, images, strict=True)]
    requests = [engine.make_request(p, sp, [img]) for p, sp, img in zip(prompts, params, images, strict=True)]
    one_batch = engine.runner.execute(requests)
    assert [o.timings["batch_size"] for o in one_batch] == [2, 2]
    for alone, batched in zip(solo, one_batch, strict=True):
        assert len(alone) == len(batched.videos)
        assert all(max_abs_diff(a, b) <= 1 for a, b in zip(alone, batched.videos, strict=True))
    assert max_abs_diff(solo[0][0], solo[1][0]) > 15
