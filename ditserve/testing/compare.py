"""Comparisons tests, benchmarks and docs share."""

from __future__ import annotations

import numpy as np
from PIL import Image


def max_abs_diff(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray) -> int:
    """Largest per-pixel difference of two uint8 images or videos, in 1/255 units."""
    return int(np.abs(np.asarray(a).astype(np.int32) - np.asarray(b).astype(np.int32)).max())
