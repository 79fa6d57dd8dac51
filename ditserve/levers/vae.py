"""VAE slicing (decode a batch one sample at a time) and tiling (decode overlapping tiles, blend the seams).

Both trade a little decode speed for peak memory: slicing bounds it by one sample instead of the batch, tiling by
one tile instead of the whole image or video, which is what lets large images and long videos decode on small
devices. Slicing is exact; tiling differs from a whole decode only near tile seams, where overlapping tiles are
blended.
"""

from __future__ import annotations

import logging
from typing import Any

from ditserve.errors import UnsupportedModelError

logger = logging.getLogger(__name__)


def _vae_of(pipeline: Any, flag: str) -> Any:
    vae = getattr(pipeline, "vae", None)
    if vae is None:
        raise UnsupportedModelError(f"{flag}=True: {type(pipeline).__name__} has no VAE", param=flag)
    return vae


def enable_vae_slicing(pipeline: Any) -> None:
    vae = _vae_of(pipeline, "vae_use_slicing")
    if not hasattr(vae, "use_slicing"):
        raise UnsupportedModelError(
            f"vae_use_slicing=True: {type(vae).__name__} does not support sliced decoding", param="vae_use_slicing")
    vae.enable_slicing()
    logger.info("VAE slicing on (%s)", type(vae).__name__)


def enable_vae_tiling(pipeline: Any) -> None:
    vae = _vae_of(pipeline, "vae_use_tiling")
    if not hasattr(vae, "use_tiling"):
        raise UnsupportedModelError(
            f"vae_use_tiling=True: {type(vae).__name__} does not support tiled decoding", param="vae_use_tiling")
    vae.enable_tiling()
    logger.info("VAE tiling on (%s)", type(vae).__name__)
