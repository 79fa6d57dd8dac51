import json
from pathlib import Path

import pytest

from ditserve.bench.report import (
    QualityMeasure,
    SpeedBasis,
    best_at,
    pareto_front,
    summary_lines,
    summary_text,
    write_outputs,
)


def _record(system: str, psnr: float, speedup: float, method: str = "m", status: str = "ok",
            worst: float | None = None, work_speedup: float | None = None) -> dict:
    return {"system": system, "method": method, "group": "baseline" if method == "uncached" else "x",
            "config": {}, "label": f"{system} {method} {speedup}", "status": status, "reason": "r",
            "psnr_db": psnr, "psnr_min_db": psnr if worst is None else worst, "ssim": 0.9, "speedup": speedup,
            "work_speedup": speedup if work_speedup is None else work_speedup,
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


def test_worst_prompt_and_work_frontiers_pick_their_own_best_settings() -> None:
    records = [_record("diffusers", 100.0, 1.0, "uncached"),
               # mean 33 dB but a worst prompt at 27: counts at 30 dB by the mean only
               _record("ditserve", 33.0, 4.0, worst=27.0, work_speedup=5.0),
               _record("ditserve", 32.0, 3.0, worst=30.5, work_speedup=6.0),
               _record("diffusers", 31.0, 2.0, worst=30.0, work_speedup=2.5)]
    assert best_at(records, "ours", 30.0, QualityMeasure.MEAN)["speedup"] == 4.0
    assert best_at(records, "ours", 30.0, QualityMeasure.WORST)["speedup"] == 3.0
    assert best_at(records, "ours", 30.0, QualityMeasure.MEAN, SpeedBasis.WORK)["work_speedup"] == 6.0
    lines = {(line["quality"], line["psnr_at_least_db"]): line for line in summary_lines(records)}
    worst = lines[("worst", 30.0)]
    assert (worst["ours_speedup"], worst["peer_speedup"], worst["ratio"]) == (3.0, 2.0, 1.5)
    assert (worst["ours_work_speedup"], worst["work_ratio"]) == (6.0, pytest.approx(6.0 / 2.5))
    assert summary_text(worst).startswith("worst-prompt PSNR >= 30 dB: ours 3.00x")


def test_summary_gives_ours_the_peers_and_the_ratio_per_level() -> None:
    lines = {line["psnr_at_least_db"]: line for line in summary_lines(RECORDS) if line["quality"] == "mean"}
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
    assert len(loaded["summary"]) == 6 and loaded["command"] == "ditserve bench --quick"
    text = paths["markdown"].read_text()
    assert "worst-prompt PSNR >= 30 dB: ours 3.00x" in text and "mean PSNR >= 30 dB" in text
    assert "| failed | r |" in text
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
