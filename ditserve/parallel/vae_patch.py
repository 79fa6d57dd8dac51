"""VAE patch parallelism: the tiles of a tiled decode are decoded on different ranks and gathered.

diffusers' ``AutoencoderKL.tiled_decode`` decodes overlapping latent tiles one after the other, then blends
neighbours. Tiles are independent until the blend, so the ranks of the VAE group each decode every
``size``-th tile, exchange them, and every rank blends all tiles exactly as diffusers does (with the VAE's own
``blend_v`` / ``blend_h``): the image equals a one-device tiled decode, and the decode's time is divided by
the group's size. The group is ranks ``0 .. size-1`` of the world (it reuses the denoising ranks).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist

from ditserve.errors import ParallelConfigError


def check_vae(vae: Any, size: int, world_size: int) -> None:
    if size > world_size:
        raise ParallelConfigError(
            f"vae_patch_parallel_size={size} must be <= the world size {world_size} set by the other degrees "
            "(VAE patch parallelism reuses the denoising ranks)", param="vae_patch_parallel_size")
    if not all(hasattr(vae, name) for name in ("tiled_decode", "blend_v", "blend_h", "tile_latent_min_size")) \
            or getattr(vae, "tile_sample_min_num_frames", None) is not None:
        raise ParallelConfigError(
            f"vae_patch_parallel_size: {type(vae).__name__} is not an image VAE with tiled decoding "
            "(AutoencoderKL); video VAEs are not supported yet", param="vae_patch_parallel_size")


def tile_origins(latent_height: int, latent_width: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of the tiles, in diffusers' order (row by row)."""
    return [(i, j) for i in range(0, latent_height, stride) for j in range(0, latent_width, stride)]


def parallel_tiled_decode(vae: Any, z: torch.Tensor, group: Any, return_dict: bool = True) -> Any:
    from diffusers.models.autoencoders.vae import DecoderOutput

    rank, size = dist.get_rank(group), dist.get_world_size(group)
    tile = vae.tile_latent_min_size
    stride = int(tile * (1 - vae.tile_overlap_factor))
    blend_extent = int(vae.tile_sample_min_size * vae.tile_overlap_factor)
    row_limit = vae.tile_sample_min_size - blend_extent
    origins = tile_origins(z.shape[2], z.shape[3], stride)

    mine = {}
    for index in range(rank, len(origins), size):
        i, j = origins[index]
        latent = z[:, :, i:i + tile, j:j + tile]
        if vae.config.use_post_quant_conv:
            latent = vae.post_quant_conv(latent)
        # objects travel through CPU memory: tiles differ in size at the edges, which tensor collectives dislike
        mine[index] = vae.decoder(latent).cpu()
    gathered: list[dict[int, torch.Tensor]] = [{} for _ in range(size)]
    dist.all_gather_object(gathered, mine, group=group)
    decoded = {index: t.to(z.device) for part in gathered for index, t in part.items()}

    columns = len(range(0, z.shape[3], stride))
    rows = [[decoded[r * columns + c] for c in range(columns)] for r in range(len(origins) // columns)]
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, current in enumerate(row):
            if i > 0:
                current = vae.blend_v(rows[i - 1][j], current, blend_extent)
            if j > 0:
                current = vae.blend_h(row[j - 1], current, blend_extent)
            result_row.append(current[:, :, :row_limit, :row_limit])
        result_rows.append(torch.cat(result_row, dim=3))
    image = torch.cat(result_rows, dim=2)
    return DecoderOutput(sample=image) if return_dict else (image,)


def install_vae_patch_parallel(vae: Any, size: int, world_size: int) -> Any:
    """Turn tiling on and decode its tiles across ranks ``0 .. size-1``. Every rank of the world must call this
    (creating the group is collective); returns the group (None on ranks outside it)."""
    check_vae(vae, size, world_size)
    group = dist.new_group(ranks=list(range(size)))
    vae.enable_tiling()
    if dist.get_rank() < size:
        vae.tiled_decode = functools.partial(parallel_tiled_decode, vae, group=group)
        return group
    return None
