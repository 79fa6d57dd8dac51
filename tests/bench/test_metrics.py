import math

import numpy as np
import pytest
from PIL import Image

from ditserve.bench.metrics import PSNR_IDENTICAL_DB, psnr_db, ssim


def _image(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_identical_images_report_the_identical_cap() -> None:
    image = _image(0)
    assert psnr_db(image, image.copy()) == PSNR_IDENTICAL_DB
    assert ssim(Image.fromarray(image), Image.fromarray(image)) == pytest.approx(1.0)


def test_psnr_of_a_uniform_error_matches_its_definition() -> None:
    reference = np.full((16, 16, 3), 100, dtype=np.uint8)
    shifted = reference + np.uint8(5)
    assert psnr_db(shifted, reference) == pytest.approx(20 * math.log10(255 / 5), abs=1e-6)


def test_quality_falls_as_the_image_drifts_from_its_reference() -> None:
    reference = _image(1)
    noise = np.random.default_rng(2).normal(0, 1, reference.shape)
    slightly = np.clip(reference + 4 * noise, 0, 255).astype(np.uint8)
    heavily = np.clip(reference + 40 * noise, 0, 255).astype(np.uint8)
    assert psnr_db(slightly, reference) > psnr_db(heavily, reference)
    assert ssim(slightly, reference) > ssim(heavily, reference)


def test_non_uint8_images_are_refused() -> None:
    with pytest.raises(TypeError, match="uint8"):
        psnr_db(np.zeros((8, 8, 3), dtype=np.float32), np.zeros((8, 8, 3), dtype=np.float32))


def test_a_video_s_ssim_is_the_mean_of_its_frames_and_its_psnr_covers_every_frame() -> None:
    reference = np.stack([_image(seed) for seed in (3, 4)])
    video = reference.copy()
    video[1] = np.clip(reference[1] + 30 * np.random.default_rng(5).normal(0, 1, reference[1].shape), 0,
                       255).astype(np.uint8)
    assert ssim(video, reference) == pytest.approx((1.0 + ssim(video[1], reference[1])) / 2)
    # the clean first frame halves the squared error: +3 dB over the damaged frame alone
    assert psnr_db(video, reference) == pytest.approx(psnr_db(video[1], reference[1]) + 10 * math.log10(2), abs=1e-6)
