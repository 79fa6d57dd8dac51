"""Tiles of diffusers' ``AutoencoderKL`` (FLUX.1, SD3, the demo model): square latent tiles of
``tile_latent_min_size``, overlapping by ``tile_overlap_factor``; the joined image is not cropped further."""

from __future__ import annotations

from typing import Any

import torch

from ditserve.parallel.vae_patch.decode import TileGrid, VaeTiling


def _grid(vae: Any, z: torch.Tensor) -> TileGrid:
    stride = int(vae.tile_latent_min_size * (1 - vae.tile_overlap_factor))
    blend = int(vae.tile_sample_min_size * vae.tile_overlap_factor)
    keep = vae.tile_sample_min_size - blend
    return TileGrid(tops=list(range(0, z.shape[-2], stride)), lefts=list(range(0, z.shape[-1], stride)),
                    blend_height=blend, blend_width=blend, keep_height=keep, keep_width=keep)


def _decode_tile(vae: Any, z: torch.Tensor, grid: TileGrid, top: int, left: int) -> torch.Tensor:
    size = vae.tile_latent_min_size
    latent = z[:, :, top:top + size, left:left + size]
    if vae.config.use_post_quant_conv:
        latent = vae.post_quant_conv(latent)
    return vae.decoder(latent)


def _finish(vae: Any, z: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return image


AUTOENCODER_KL = VaeTiling(grid=_grid, decode_tile=_decode_tile, finish=_finish)
