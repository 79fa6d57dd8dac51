"""Image and video quality against a reference, and the statistics the bench reports. A video is its uint8
frames (frames x height x width x 3): its PSNR is over all of its pixels, its SSIM the mean of its frames'."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np
from PIL import Image

#: PSNR reported for bit-identical images (the true value is infinite, which JSON cannot hold)
PSNR_IDENTICAL_DB = 100.0


def as_uint8(image: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.dtype != np.uint8:
        raise TypeError(f"images are compared as uint8 RGB, got dtype {array.dtype}")
    return array


def psnr_db(image: Image.Image | np.ndarray, reference: Image.Image | np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    a, b = as_uint8(image), as_uint8(reference)
    if np.array_equal(a, b):
        return PSNR_IDENTICAL_DB
    return min(float(peak_signal_noise_ratio(b, a, data_range=255)), PSNR_IDENTICAL_DB)


def ssim(image: Image.Image | np.ndarray, reference: Image.Image | np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    a, b = as_uint8(image), as_uint8(reference)
    if a.ndim == 4:
        return float(np.mean([ssim(frame, reference_frame) for frame, reference_frame in zip(a, b, strict=True)]))
    # the default 7-pixel window needs images of at least 7x7; smaller test images use an odd window that fits
    window = min(7, *(side if side % 2 else side - 1 for side in a.shape[:2]))
    return float(structural_similarity(b, a, channel_axis=2, data_range=255, win_size=window))


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    return float(statistics.median(values))


def mean(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    return float(statistics.fmean(values))
