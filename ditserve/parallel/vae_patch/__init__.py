"""VAE patch parallelism: the tiles of a tiled decode are decoded on different ranks and gathered.

diffusers' tiled decodes cut the latent into overlapping spatial tiles, decode them one after the other, then
blend neighbours. Tiles are independent until the blend, so the ranks of the VAE group each decode every
``size``-th tile, exchange them (``decode.gather_tiles``), and every rank blends all tiles exactly as diffusers
does, with the VAE's own ``blend_v`` / ``blend_h``: the output equals a one-device tiled decode of the same VAE,
and the decode's time is divided by the group's size. The group is ranks ``0 .. size-1`` of the world (it reuses
the denoising ranks).

Per VAE class only the tile grid, the decode of one tile and the finish of the joined image differ
(``image.py``: ``AutoencoderKL``; ``causal_video.py``: ``AutoencoderKLWan``, ``AutoencoderKLQwenImage``). VAEs
are matched by exact class: a subclass may tile differently, so it is refused rather than decoded wrongly.
"""

from __future__ import annotations

import functools
from typing import Any

import torch.distributed as dist

from ditserve.errors import ParallelConfigError
from ditserve.parallel.vae_patch.causal_video import QWEN_IMAGE, WAN
from ditserve.parallel.vae_patch.decode import TileGrid, VaeTiling, parallel_tiled_decode
from ditserve.parallel.vae_patch.image import AUTOENCODER_KL

__all__ = ["TileGrid", "VaeTiling", "check_vae", "install_vae_patch_parallel", "parallel_tiled_decode",
           "supported_vaes", "tiling_for"]

#: diffusers VAE class name -> how it tiles
TILINGS: dict[str, VaeTiling] = {
    "AutoencoderKL": AUTOENCODER_KL,
    "AutoencoderKLQwenImage": QWEN_IMAGE,
    "AutoencoderKLWan": WAN,
}


def supported_vaes() -> list[str]:
    return sorted(TILINGS)


def tiling_for(vae: Any) -> VaeTiling | None:
    """The tiling plan of ``vae``'s exact diffusers class, or None."""
    import diffusers

    name = type(vae).__name__
    if name in TILINGS and type(vae) is getattr(diffusers, name):
        return TILINGS[name]
    return None


def check_vae(vae: Any, size: int, world_size: int) -> VaeTiling:
    if size > world_size:
        raise ParallelConfigError(
            f"vae_patch_parallel_size={size} must be <= the world size {world_size} set by the other degrees "
            "(VAE patch parallelism reuses the denoising ranks)", param="vae_patch_parallel_size")
    tiling = tiling_for(vae)
    if tiling is None:
        raise ParallelConfigError(
            f"vae_patch_parallel_size={size}: {type(vae).__name__} has no tile plan; VAEs with VAE patch "
            f"parallelism: {supported_vaes()}", param="vae_patch_parallel_size")
    return tiling


def install_vae_patch_parallel(vae: Any, size: int, world_size: int) -> Any:
    """Turn tiling on (keeping the VAE's tile sizes) and decode its tiles across ranks ``0 .. size-1``. Every rank
    of the world must call this (creating the group is collective); returns the group (None on ranks outside
    it)."""
    tiling = check_vae(vae, size, world_size)
    group = dist.new_group(ranks=list(range(size)))
    vae.enable_tiling()
    if dist.get_rank() < size:
        vae.tiled_decode = functools.partial(parallel_tiled_decode, vae, tiling, group=group)
        return group
    return None
