import json
from pathlib import Path

import pytest

from ditserve.bench.report import best_at, pareto_front, summary_lines, write_outputs


def _record(system: str, psnr: float, speedup: float, method: str = "m", status: str = "ok") -> dict:
    return {"system": system, "method": method, "group": "baseline" if method == "uncached" else "x",
            "config": {}, "label": f"{system} {method} {speedup}", "status": status, "reason": "r",
            "psnr_db": psnr, "psnr_min_db": psnr, "ssim": 0.9, "speedup": speedup,
            "speedup_vs_diffusers_uncached": speedup, "speedup_vs_ditserve_uncached": speedup,
            "median_s": 1 / speedup, "denoise_median_s": None, "compute_fraction": 0.5, "adherence": None}


RECORDS = [
    _record("diffusers", 100.0, 1.0, "uncached"), _record("ditserve", 100.0, 1.1, "uncached"),
    _record("ditserve", 36.0, 2.0), _record("ditserve", 31.0, 3.0), _record("ditserve", 26.0, 4.0),
    _record("diffusers", 34.0, 1.5), _record("cache-dit", 29.0, 2.5), _record("diffusers", 20.0, 9.0),
    _record("ditserve", 50.0, 99.0, status="failed"),
]


def test_pareto_front_keeps_only_points_nothing_beats_on_both_axes() -> None:
    points = [(40.0, 1.0), (35.0, 2.0), (34.0, 1.5), (30.0, 3.0), (25.0, 2.5)]
    assert pareto_front(points) == [(40.0, 1.0), (35.0, 2.0), (30.0, 3.0)]


def test_best_at_takes_the_fastest_setting_of_a_side_that_reaches_the_level() -> None:
    assert best_at(RECORDS, "ours", 30.0)["speedup"] == 3.0
    # cache-dit on diffusers counts as a peer; failed rows never count
    assert best_at(RECORDS, "peers", 25.0)["speedup"] == 2.5
    assert best_at(RECORDS, "ours", 101.0) is None


def test_summary_gives_ours_the_peers_and_the_ratio_per_level() -> None:
    lines = {line["psnr_at_least_db"]: line for line in summary_lines(RECORDS)}
    assert lines[25.0]["ratio"] == pytest.approx(4.0 / 2.5)
    assert lines[30.0]["ratio"] == pytest.approx(3.0 / 1.5)
    assert lines[35.0]["ours_speedup"] == 2.0 and lines[35.0]["peer_speedup"] == 1.0


def test_write_outputs_makes_json_markdown_and_plot(tmp_path: Path) -> None:
    results = {"model": "m", "model_path": "p", "device": "cpu (x)", "dtype": "float32", "torch_version": "t",
               "diffusers_version": "d", "cache_dit_version": "c", "cpu_count": 2, "platform": "linux",
               "steps": 4, "prompts": ["a"], "repeats": 1, "seeds": [0], "sampling": {}, "started": "now",
               "duration_s": 1.0, "baseline_median_s_per_pass": {"ditserve": [1.0, 1.1]}, "uncached_parity": {"psnr_db": 99.0, "ssim": 1.0},
               "records": RECORDS}
    paths = write_outputs(results, tmp_path / "out", command="ditserve bench --quick")
    loaded = json.loads(paths["json"].read_text())
    assert len(loaded["summary"]) == 3 and loaded["command"] == "ditserve bench --quick"
    text = paths["markdown"].read_text()
    assert "PSNR >= 30 dB: ours 3.00x" in text and "| failed | r |" in text
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
