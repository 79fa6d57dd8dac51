"""``ditserve bench --quick`` end to end, in-process, on the tiny FLUX pipeline (one run shared by the tests)."""

import json
from pathlib import Path

import pytest

from ditserve.entrypoints.cli import main

RECORD_FIELDS = ("system", "method", "config", "median_s", "speedup", "compute_fraction", "psnr_db", "ssim",
                 "adherence")


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory, tiny_flux_dir: str) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    assert main(["bench", "--quick", "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "results.json").read_text()), out


def _records(results: dict, **match: str) -> list[dict]:
    return [r for r in results["records"] if all(r.get(k) == v for k, v in match.items())]


def test_quick_run_writes_the_three_outputs(quick_results) -> None:
    results, out = quick_results
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (out / "results.md").read_text()
    assert "## Summary" in markdown and "PSNR >= 30 dB" in markdown
    assert results["steps"] == 4 and results["quick"] is True
    assert {"model", "device", "torch_version", "steps", "prompts"} <= set(results)


def test_every_record_is_complete_or_says_why_not(quick_results) -> None:
    results, _ = quick_results
    for record in results["records"]:
        if record["status"] == "ok":
            assert all(field in record for field in RECORD_FIELDS), record["label"]
            assert record["median_s"] > 0
        else:
            assert record["reason"], record["label"]
    assert _records(results, method="SeaCache")[0]["status"] == "unavailable"


def test_baselines_do_all_the_work_and_agree_with_each_other(quick_results) -> None:
    results, _ = quick_results
    for system in ("ditserve", "diffusers"):
        baseline = _records(results, system=system, method="uncached")[0]
        assert baseline["compute_fraction"] == 1.0
        assert baseline["speedup_vs_" + system + "_uncached"] == 1.0
    # our engine reproduces diffusers' pipeline on the same seeds (fp32 CPU)
    assert results["uncached_parity"]["psnr_db"] >= 40


def test_a_cache_that_skips_shows_less_counted_work_and_lower_psnr(quick_results) -> None:
    results, _ = quick_results
    taylor = _records(results, method="TaylorSeerCache")[0]
    assert taylor["status"] == "ok"
    assert taylor["compute_fraction"] < 1.0
    assert taylor["psnr_db"] < 100.0


def test_ours_counted_work_matches_what_the_cache_reports(quick_results) -> None:
    results, _ = quick_results
    ours = [r for r in _records(results, group="ours") if r["status"] == "ok" and r["reported_work_fraction"]]
    for record in ours:
        assert record["compute_fraction"] == pytest.approx(record["reported_work_fraction"], abs=0.02), record["label"]


def test_bad_sizes_are_refused_with_the_flag_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "--quick", "--repeats", "0", "--out", str(tmp_path)]) == 2
    assert "--repeats=0 must be >= 1" in capsys.readouterr().err


def test_frames_are_checked_and_recorded_in_the_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ditserve.bench.cli import command_line
    from ditserve.entrypoints.cli import build_parser

    assert main(["bench", "--quick", "--num-frames", "0", "--out", str(tmp_path)]) == 2
    assert "--num-frames=0 must be >= 1" in capsys.readouterr().err
    args = build_parser().parse_args(["bench", "some/wan", "--num-frames", "9", "--prompts", "3", "--out", str(tmp_path)])
    assert "--num-frames 9" in command_line(args) and "--prompts 3" in command_line(args)
