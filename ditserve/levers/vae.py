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


def _enable(pipeline: Any, flag: str, mode: str, description: str) -> None:
    """Turn on the VAE's ``use_<mode>`` decoding; a pipeline or VAE without it is an error naming ``flag``."""
    vae = getattr(pipeline, "vae", None)
    if vae is None:
        raise UnsupportedModelError(f"{flag}=True: {type(pipeline).__name__} has no VAE", param=flag)
    if not hasattr(vae, f"use_{mode}"):
        raise UnsupportedModelError(
            f"{flag}=True: {type(vae).__name__} does not support {description} decoding", param=flag)
    getattr(vae, f"enable_{mode}")()
    logger.info("VAE %s on (%s)", mode, type(vae).__name__)


def enable_vae_slicing(pipeline: Any) -> None:
    _enable(pipeline, "vae_use_slicing", "slicing", "sliced")


def enable_vae_tiling(pipeline: Any) -> None:
    _enable(pipeline, "vae_use_tiling", "tiling", "tiled")
