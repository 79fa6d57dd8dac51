"""VAE patch parallelism: two gloo ranks decode the tiles of one latent and both get the one-device tiled decode,
for every VAE class with a tile plan (FLUX's AutoencoderKL, Qwen-Image's and Wan's causal video VAEs).

All cases share one 2-rank group (rank 0 is the pytest process, rank 1 one spawned process: a process start
costs about 7 s of imports)."""

from __future__ import annotations

import multiprocessing
import socket
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from ditserve.errors import ParallelConfigError
from ditserve.parallel.vae_patch import (
    check_vae,
    install_vae_patch_parallel,
    parallel_tiled_decode,
    tiling_for,
)
from ditserve.testing.common import tiny_image_vae


@dataclass(frozen=True)
class VaeCase:
    name: str
    #: "autoencoder_kl", "wan22" (built from a seed) or a tiny pipeline folder whose "vae" is loaded
    source: str
    latent_shape: tuple[int, ...]
    #: enable_tiling(...) arguments of the causal video VAEs (tile sizes in pixels)
    tiling: dict[str, int] = field(default_factory=dict)
    #: call vae.tiled_decode directly (a latent smaller than the tile: one tile, rank 1 decodes none)
    direct: bool = False


def build_vae(case: VaeCase) -> Any:
    from diffusers import AutoencoderKLWan, AutoModel

    torch.manual_seed(0)
    if case.source == "autoencoder_kl":
        vae = tiny_image_vae()
        # small tiles so that a 40x40 latent makes a 4x4 grid of overlapping tiles
        vae.tile_latent_min_size, vae.tile_sample_min_size, vae.tile_overlap_factor = 16, 32, 0.25
        vae.enable_tiling()
        return vae
    if case.source == "wan22":
        # Wan2.2-TI2V-5B's VAE layout: 16x spatial compression, decoded to 2x2 patches of pixels, residual blocks
        vae = AutoencoderKLWan(base_dim=8, z_dim=8, in_channels=12, out_channels=12, patch_size=2,
                               scale_factor_spatial=16, is_residual=True, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                               temperal_downsample=[False, True, True], latents_mean=[0.0] * 8,
                               latents_std=[1.0] * 8).eval()
    else:
        vae = AutoModel.from_pretrained(case.source, subfolder="vae").eval()
    vae.enable_tiling(**case.tiling)
    return vae


def latent(case: VaeCase) -> torch.Tensor:
    return torch.randn(case.latent_shape, generator=torch.Generator().manual_seed(1))


def decode(vae: Any, case: VaeCase) -> torch.Tensor:
    with torch.no_grad():
        return vae.tiled_decode(latent(case)).sample if case.direct else vae.decode(latent(case)).sample


def one_device_tiled_decode(case: VaeCase) -> torch.Tensor:
    return decode(build_vae(case), case)


def cases() -> list[VaeCase]:
    from ditserve.testing import tiny_pipeline_dir

    # tiles smaller than the latents, with different heights and widths (a swapped axis shows), and grids whose
    # tile count is odd (rank 0 holds one tile more than rank 1: padded slots)
    return [
        VaeCase("autoencoder_kl", "autoencoder_kl", (1, 4, 40, 40)),
        # 4x compression: 8x10 latent tiles, strides 6 and 7 -> a 3x3 grid over 16x20
        VaeCase("qwen_image", tiny_pipeline_dir("qwen_image"), (1, 4, 1, 16, 20),
                {"tile_sample_min_height": 32, "tile_sample_min_width": 40, "tile_sample_stride_height": 24,
                 "tile_sample_stride_width": 28}),
        # 8x compression, 2 latent frames (5 video frames): 4x6 latent tiles, strides 3 and 4 -> 4x3 over 10x12
        VaeCase("wan", tiny_pipeline_dir("wan"), (1, 16, 2, 10, 12),
                {"tile_sample_min_height": 32, "tile_sample_min_width": 48, "tile_sample_stride_height": 24,
                 "tile_sample_stride_width": 32}),
        # 16x compression, patch 2: 4x4 latent tiles, strides 3 and 2 -> 2x4 over 6x7
        VaeCase("wan22_patch2", "wan22", (1, 8, 2, 6, 7),
                {"tile_sample_min_height": 64, "tile_sample_min_width": 64, "tile_sample_stride_height": 48,
                 "tile_sample_stride_width": 32}),
        VaeCase("wan_one_tile", tiny_pipeline_dir("wan"), (1, 16, 2, 3, 4),
                {"tile_sample_min_height": 32, "tile_sample_min_width": 40, "tile_sample_stride_height": 24,
                 "tile_sample_stride_width": 32}, direct=True),
    ]


def count_calls(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda _module, _args: calls.append(1))
    return calls


def decode_on_rank(rank: int, port: int, vae_cases: list[VaeCase], rank1_file: str) -> dict[str, tuple]:
    """Decode every case on this rank; returns (and rank 1 saves) {case: (image, decoder calls)}, the calls counted
    per tile, and per frame for the video VAEs."""
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 ranks on 2 cores
    timeout = timedelta(seconds=60)
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timeout)
    results = {}
    try:
        for case in vae_cases:
            vae = build_vae(case)
            install_vae_patch_parallel(vae, size=2, world_size=2)
            calls = count_calls(vae.decoder)
            results[case.name] = (decode(vae, case), len(calls))
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(saved_threads)
    if rank == 1:
        torch.save(results, rank1_file)
    return results


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def vae_cases() -> list[VaeCase]:
    return cases()


@pytest.fixture(scope="module")
def two_rank_decodes(vae_cases: list[VaeCase], tmp_path_factory) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Each case decoded by ranks 0 and 1 of one 2-rank group."""
    port, rank1_file = _free_port(), str(tmp_path_factory.mktemp("vae_patch") / "rank1.pt")
    worker = multiprocessing.get_context("spawn").Process(target=decode_on_rank,
                                                          args=(1, port, vae_cases, rank1_file), daemon=True)
    worker.start()
    try:
        rank0 = decode_on_rank(0, port, vae_cases, rank1_file)
    finally:
        worker.join(timeout=60)
    assert worker.exitcode == 0
    return rank0, torch.load(rank1_file)


@pytest.mark.parametrize("name", ["autoencoder_kl", "qwen_image", "wan", "wan22_patch2", "wan_one_tile"])
def test_two_ranks_decode_the_one_device_tiled_image(name: str, vae_cases: list[VaeCase],
                                                     two_rank_decodes: tuple[dict, dict]) -> None:
    case = next(c for c in vae_cases if c.name == name)
    vae, z = build_vae(case), latent(case)
    tiles = len(tiling_for(vae).grid(vae, z).origins())
    assert tiles == 1 if case.direct else tiles >= 4  # the case really is tiled
    expected = one_device_tiled_decode(case)
    frames = z.shape[2] if z.dim() == 5 else 1
    for rank, results in enumerate(two_rank_decodes):
        image, decoder_calls = results[name]
        assert image.shape == expected.shape
        assert (image - expected).abs().max().item() < 1e-4, f"rank {rank}"
        # each rank decoded its own share of the tiles (tiles rank, rank + 2, ...), every frame of each
        assert decoder_calls == len(range(rank, tiles, 2)) * frames


def test_tiled_decode_differs_from_the_whole_decode_so_the_oracle_is_the_tiled_one(vae_cases) -> None:
    # guards the parity test's meaning: a blend or crop mistake cannot hide behind "tiles equal the whole image"
    case = next(c for c in vae_cases if c.name == "wan")
    vae = build_vae(case)
    tiled = decode(vae, case)
    vae.disable_tiling()
    assert (decode(vae, case) - tiled).abs().max().item() > 1e-3


def test_vae_patch_size_over_the_world_or_a_vae_without_a_tile_plan_is_an_error() -> None:
    from diffusers import AutoencoderKL, AutoencoderTiny

    with pytest.raises(ParallelConfigError, match="world size"):
        check_vae(tiny_image_vae(), size=4, world_size=2)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8,), decoder_block_out_channels=(8,),
                           num_encoder_blocks=(1,), num_decoder_blocks=(1,), latent_channels=4)

    class TiledDifferently(AutoencoderKL):
        pass

    for vae in (tiny, TiledDifferently(block_out_channels=(8,), norm_num_groups=8)):
        with pytest.raises(ParallelConfigError, match=rf"vae_patch_parallel_size=2: {type(vae).__name__} has no "
                                                      r"tile plan.*\['AutoencoderKL', 'AutoencoderKLQwenImage', "
                                                      r"'AutoencoderKLWan'\]"):
            check_vae(vae, size=2, world_size=2)


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

