"""measure_lever: the bench's view of one lever against the plain run of the same model."""

from __future__ import annotations

import math

import pytest

from ditserve.errors import InvalidParameterError
from ditserve.levers.measure import measure_lever, psnr_db
from tests.levers.conftest import BASE

PARAMS = {**BASE, "num_inference_steps": 2}


def test_exact_lever_reports_bit_exact_output_and_both_phases(tiny_flux_dir: str) -> None:
    result = measure_lever(tiny_flux_dir, {"vae_use_slicing": True}, params=PARAMS, runs=2, warmup=0)
    assert result["bit_exact"] and result["max_abs_diff"] == 0 and math.isinf(result["psnr_db"])
    assert result["weight_ratio"] == 1.0
    assert result["plain"]["levers"] == [] and result["levered"]["levers"] == ["vae_slicing"]
    for phase in ("plain", "levered"):
        assert len(result[phase]["times_s"]) == 2 and result[phase]["median_s"] > 0
        assert result[phase]["peak_memory_bytes"] > 0 and result[phase]["memory_kind"] == "peak_rss"
    assert result["speedup"] == pytest.approx(result["plain"]["median_s"] / result["levered"]["median_s"])


def test_lossy_lever_reports_its_quality(tiny_flux_dir: str) -> None:
    result = measure_lever(tiny_flux_dir, {"quantization": "int8"}, params=PARAMS, runs=1, warmup=0)
    assert not result["bit_exact"] and result["max_abs_diff"] > 0
    # int8 weights with one float scale per row: about a quarter of fp32
    assert 0.2 < result["weight_ratio"] < 0.35
    assert 20 < result["psnr_db"] < math.inf


def test_psnr_of_a_known_difference() -> None:
    import numpy as np

    reference = [np.zeros((4, 4, 3), dtype=np.uint8)]
    assert psnr_db(reference, [np.full((4, 4, 3), 255, dtype=np.uint8)]) == pytest.approx(0.0)
    assert psnr_db(reference, [np.full((4, 4, 3), 1, dtype=np.uint8)]) == pytest.approx(20 * math.log10(255))


def test_bad_run_counts_are_refused(tiny_flux_dir: str) -> None:
    with pytest.raises(InvalidParameterError, match="runs=0"):
        measure_lever(tiny_flux_dir, {}, runs=0)
