"""Tiles of the causal 3-D VAEs: ``AutoencoderKLWan`` (Wan2.x) and ``AutoencoderKLQwenImage`` (Qwen-Image: Wan's
2.1 VAE decoding one frame). Tiles are spatial only: each one is decoded over all frames, frame by frame,
through the VAE's causal feature cache, which is cleared per tile (a tile's cache must not leak into the next).
Tile sizes and strides are set in pixels (``enable_tiling(tile_sample_min_height=..., ...)``).

Wan2.2's VAE (``patch_size`` 2) decodes to patches of pixels: its blend and crop work in patch units, and the
joined image is un-patched. Wan clamps the decoded video to [-1, 1]; Qwen-Image's tiled decode does not."""

from __future__ import annotations

from typing import Any

import torch

from ditserve.parallel.vae_patch.decode import TileGrid, VaeTiling


def _patch_size(vae: Any) -> int:
    return getattr(vae.config, "patch_size", None) or 1


def _latent_tile(vae: Any) -> tuple[int, int]:
    ratio = vae.spatial_compression_ratio
    return vae.tile_sample_min_height // ratio, vae.tile_sample_min_width // ratio


def _grid(vae: Any, z: torch.Tensor) -> TileGrid:
    ratio, patch = vae.spatial_compression_ratio, _patch_size(vae)
    stride_height, stride_width = vae.tile_sample_stride_height, vae.tile_sample_stride_width
    return TileGrid(
        tops=list(range(0, z.shape[-2], stride_height // ratio)),
        lefts=list(range(0, z.shape[-1], stride_width // ratio)),
        blend_height=vae.tile_sample_min_height // patch - stride_height // patch,
        blend_width=vae.tile_sample_min_width // patch - stride_width // patch,
        keep_height=stride_height // patch, keep_width=stride_width // patch)


def _decode_frames(vae: Any, z: torch.Tensor, top: int, left: int, first_chunk_flag: bool) -> torch.Tensor:
    height, width = _latent_tile(vae)
    vae.clear_cache()
    frames = []
    for k in range(z.shape[2]):
        vae._conv_idx = [0]  # the decoder walks the cache from its first causal conv for every frame
        latent = vae.post_quant_conv(z[:, :, k:k + 1, top:top + height, left:left + width])
        # Wan's decoder treats the first frame apart (first_chunk); Qwen-Image's decoder has no such argument
        extra = {"first_chunk": k == 0} if first_chunk_flag else {}
        frames.append(vae.decoder(latent, feat_cache=vae._feat_map, feat_idx=vae._conv_idx, **extra))
    vae.clear_cache()  # frees the cached features of this tile now rather than at the next decode
    return torch.cat(frames, dim=2)


def _decode_wan_tile(vae: Any, z: torch.Tensor, grid: TileGrid, top: int, left: int) -> torch.Tensor:
    return _decode_frames(vae, z, top, left, first_chunk_flag=True)


def _decode_qwen_image_tile(vae: Any, z: torch.Tensor, grid: TileGrid, top: int, left: int) -> torch.Tensor:
    return _decode_frames(vae, z, top, left, first_chunk_flag=False)


def _crop_to_image(vae: Any, z: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """The last row and column of tiles overshoot the image: keep the latent's extent (in patch units)."""
    ratio, patch = vae.spatial_compression_ratio, _patch_size(vae)
    return image[..., :z.shape[-2] * ratio // patch, :z.shape[-1] * ratio // patch]


def _finish_wan(vae: Any, z: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    image = _crop_to_image(vae, z, image)
    if vae.config.patch_size is not None:
        image = unpatchify(image, patch_size=vae.config.patch_size)
    return torch.clamp(image, min=-1.0, max=1.0)


WAN = VaeTiling(grid=_grid, decode_tile=_decode_wan_tile, finish=_finish_wan)
QWEN_IMAGE = VaeTiling(grid=_grid, decode_tile=_decode_qwen_image_tile, finish=_crop_to_image)
