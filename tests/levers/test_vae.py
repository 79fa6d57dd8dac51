"""VAE slicing and tiling: slicing is exact and decodes one sample at a time; tiling stays close to the whole
decode at sizes where tiles overlap (images and video); both work through the engine."""

from __future__ import annotations

import types
from typing import Any
from unittest import mock

import pytest
import torch

from ditserve import Omni
from ditserve.errors import UnsupportedModelError
from ditserve.levers.vae import enable_vae_slicing, enable_vae_tiling
from ditserve.models.loader import load_model
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.compare import max_abs_diff
from tests.levers.conftest import BASE, PROMPT


def latents(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator("cpu").manual_seed(seed))


def decode(vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(z, return_dict=False)[0]


#: mean |tiled - whole| allowed, in the VAE's [-1, 1] output range (0.1 is about 13/255): random tiny VAEs see
#: further than the overlap of their 32-64 pixel tiles, so seams differ more than with a trained VAE and real tiles
TILING_TOLERANCE = 0.1


def assert_tiled_close(pipeline: Any, z: torch.Tensor) -> None:
    """With the lever on, the decode is tiled (it differs from the whole decode) and stays within tolerance."""
    vae = pipeline.vae
    whole = decode(vae, z)
    enable_vae_tiling(pipeline)
    with mock.patch.object(vae, "tiled_decode", wraps=vae.tiled_decode) as tiled_spy:
        tiled = decode(vae, z)
    assert tiled_spy.called
    assert 0 < (tiled - whole).abs().mean() < TILING_TOLERANCE


@pytest.fixture(scope="module")
def flux_pipeline(tiny_flux_dir: str):
    return load_model(tiny_flux_dir, device="cpu").pipeline


def test_image_vae_tiling_with_overlapping_tiles(flux_pipeline) -> None:
    # 40x40 latents against 16-latent tiles with 25% overlap: a 3x3 grid of overlapping tiles
    assert flux_pipeline.vae.tile_latent_min_size == 16
    try:
        assert_tiled_close(flux_pipeline, latents(1, 4, 40, 40))
    finally:
        flux_pipeline.vae.disable_tiling()


def test_image_vae_slicing_is_exact_and_decodes_one_sample_at_a_time(flux_pipeline) -> None:
    vae = flux_pipeline.vae
    z = latents(3, 4, 16, 16)
    whole = decode(vae, z)
    enable_vae_slicing(flux_pipeline)
    try:
        with mock.patch.object(vae, "_decode", wraps=vae._decode) as decode_spy:
            sliced = decode(vae, z)
    finally:
        vae.disable_slicing()
    assert [call.args[0].shape[0] for call in decode_spy.call_args_list] == [1, 1, 1]
    assert torch.allclose(sliced, whole, rtol=0, atol=1e-5)


def test_video_vae_tiling_with_overlapping_tiles() -> None:
    pipeline = load_model(tiny_pipeline_dir("wan"), device="cpu").pipeline
    vae = pipeline.vae
    # the default 256-pixel tiles exceed this tiny 96-pixel video: smaller tiles (kept when tiling is enabled)
    # make a 3x3 grid of overlapping tiles
    vae.tile_sample_min_height = vae.tile_sample_min_width = 64
    vae.tile_sample_stride_height = vae.tile_sample_stride_width = 32
    assert_tiled_close(pipeline, latents(1, 16, 2, 12, 12))


def test_engine_applies_slicing_and_tiling(tiny_flux_dir: str, plain_flux_images: list) -> None:
    with Omni(model=tiny_flux_dir, vae_use_slicing=True, vae_use_tiling=True) as omni:
        model = omni.engine.runner.model
        images = omni.generate(PROMPT, seed=5, **BASE)[0].images
        assert model.pipeline.vae.use_slicing and model.pipeline.vae.use_tiling
        assert model.levers == ["vae_slicing", "vae_tiling"]
    # 64x64 images are 32x32 latents: tiled with 16-latent tiles, so close to the plain output, not equal
    assert 0 < max_abs_diff(images[0], plain_flux_images[0]) < 128


def test_pipeline_without_a_capable_vae_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="has no VAE"):
        enable_vae_tiling(types.SimpleNamespace())
    with pytest.raises(UnsupportedModelError, match="does not support sliced decoding"):
        enable_vae_slicing(types.SimpleNamespace(vae=torch.nn.Linear(1, 1)))
