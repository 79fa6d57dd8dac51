from pathlib import Path

import pytest

from ditserve.bench import levers
from ditserve.bench.runner import BenchOptions
from ditserve.errors import InvalidParameterError


def _fake_measure(model, lever, *, prompt, params, runs, warmup, base_kwargs):
    if "quantization" in lever:
        raise InvalidParameterError("quantization needs a GPU here", param="quantization")
    phase = {"median_s": 1.0, "peak_memory_bytes": 2**30, "memory_kind": "peak_rss", "warmup_s": 0.5}
    return {"speedup": 1.25, "plain": phase, "levered": {**phase, "median_s": 0.8},
            "memory_ratio": 1.0, "psnr_db": float("inf"), "bit_exact": True, "max_abs_diff": 0,
            "seen": (model, prompt, params, runs, base_kwargs)}


def test_each_lever_is_measured_or_listed_with_the_reason(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          tiny_flux_dir: str) -> None:
    monkeypatch.setattr(levers, "_measure_function", lambda: _fake_measure)
    results = levers.run_levers(BenchOptions(model=tiny_flux_dir, steps=3, repeats=2, seed=7))
    rows = {row["lever"]: row for row in results["levers"]}
    assert set(rows) == {levers._lever_name(lever) for lever in levers.LEVERS}
    assert rows["vae_use_slicing=True"]["speedup"] == 1.25
    assert rows["vae_use_slicing=True"]["psnr_db"] is None and rows["vae_use_slicing=True"]["bit_exact"]
    assert rows["quantization=int8"]["status"] == "unavailable"
    assert "needs a GPU" in rows["quantization=int8"]["reason"]
    paths = levers.write_levers(results, tmp_path, command="ditserve bench --levers")
    text = paths["markdown"].read_text()
    assert "| vae_use_slicing=True | 1.25x |" in text and "identical" in text


def test_missing_measure_module_lists_every_lever_as_unavailable(monkeypatch: pytest.MonkeyPatch,
                                                                 tiny_flux_dir: str) -> None:
    monkeypatch.setattr(levers, "_measure_function", lambda: ImportError("no module"))
    results = levers.run_levers(BenchOptions(model=tiny_flux_dir))
    assert all(row["status"] == "unavailable" and "not in this build" in row["reason"] for row in results["levers"])
