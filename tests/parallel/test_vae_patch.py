"""VAE patch parallelism: two gloo ranks decode the tiles of one latent and get the one-device tiled image."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ditserve.errors import ParallelConfigError
from ditserve.parallel.vae_patch import (
    check_vae,
    install_vae_patch_parallel,
    parallel_tiled_decode,
    tile_origins,
)
from ditserve.testing.common import tiny_image_vae


def small_tiled_vae():
    torch.manual_seed(0)
    vae = tiny_image_vae()
    # small tiles so that a 40x40 latent makes a 4x4 grid of overlapping tiles
    vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor = 16, 32, 0.25
    return vae


def latent() -> torch.Tensor:
    return torch.randn(1, 4, 40, 40, generator=torch.Generator().manual_seed(1))


def _rank(rank: int, port: int, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        vae = small_tiled_vae()
        install_vae_patch_parallel(vae, size=2, world_size=2)
        with torch.no_grad():
            image = vae.decode(latent()).sample
        if rank == 0:
            torch.save(image, result_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_decode_the_same_image_as_one_device_tiling(tmp_path) -> None:
    vae = small_tiled_vae()
    vae.enable_tiling()
    with torch.no_grad():
        expected = vae.decode(latent()).sample
    assert len(tile_origins(40, 40, 12)) == 16  # the case really is tiled
    result = tmp_path / "image.pt"
    mp.start_processes(_rank, args=(_free_port(), str(result)), nprocs=2, start_method="spawn", join=True)
    assert torch.allclose(torch.load(result), expected, atol=1e-5)


def test_vae_patch_size_over_the_world_or_a_video_vae_is_an_error() -> None:
    with pytest.raises(ParallelConfigError, match="world size"):
        check_vae(small_tiled_vae(), size=4, world_size=2)
    from diffusers import AutoencoderKLWan

    with pytest.raises(ParallelConfigError, match="video VAEs"):
        check_vae(AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1,
                                   temperal_downsample=[False]), size=2, world_size=2)


def test_omni_with_cfg_and_vae_patch_parallel_equals_one_device_tiled_decode() -> None:
    import numpy as np

    from ditserve import Omni
    from ditserve.testing import tiny_pipeline_dir

    # 64x128 images are 32x64 latents: tiles of 16 with stride 12 make a 3 x 6 grid (tiny FLUX VAE)
    params = {"num_inference_steps": 2, "height": 64, "width": 128, "seed": 3, "true_cfg_scale": 3.0,
              "negative_prompt": "red"}
    with Omni(model=tiny_pipeline_dir("flux"), vae_use_tiling=True) as omni:
        expected = np.asarray(omni.generate("a small red circle", params)[0].images[0], dtype=np.int16)
    parallel = {"cfg_parallel_size": 2, "vae_patch_parallel_size": 2, "timeout_s": 30}
    with Omni(model=tiny_pipeline_dir("flux"), parallel_config=parallel) as omni:
        vae = omni.engine.runner.local.model.pipeline.vae
        assert vae.tiled_decode.func is parallel_tiled_decode  # rank 0 decodes through the patch-parallel path
        image = np.asarray(omni.generate("a small red circle", params)[0].images[0], dtype=np.int16)
    assert np.abs(image - expected).max() <= 1


def test_vae_patch_larger_than_the_denoising_world_is_refused_at_config() -> None:
    from ditserve.config import DiffusionParallelConfig

    with pytest.raises(ParallelConfigError, match="vae_patch_parallel_size=2 must be <= the world size 1"):
        DiffusionParallelConfig(vae_patch_parallel_size=2)
    assert DiffusionParallelConfig(cfg_parallel_size=2, vae_patch_parallel_size=2).world_size == 2
