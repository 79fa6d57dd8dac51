"""``ditserve bench scale``: the dry run (tiny scale, CPU) end to end, the planner and budget, the published
configs, and the command line's checks. No timing is asserted: figures come from the benchmark's own runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ditserve.bench import scale, scale_report
from ditserve.bench.scale_models import (
    MODELS,
    Scale,
    build_module,
    build_pipeline,
    vae_latent_shape,
    workload,
)
from ditserve.bench.scale_report import DERIVED_STEPS, MODEL_NAMES, Row, Status
from ditserve.engine.runner import ModelRunner
from ditserve.entrypoints.cli import main
from ditserve.levers.fp8 import unmatched_patterns

#: the rows a CPU cannot run and why (the engine's own refusal, or the compile opt-in)
CPU_UNAVAILABLE = {Row.FP8: "CUDA", Row.LAYERWISE_OFFLOAD: "CUDA", Row.MODEL_OFFLOAD: "CUDA"}
CPU_SKIPPED = {Row.COMPILE: "--rows", Row.COMPILE_FP8: "--rows"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("scale")
    assert main(["bench", "scale", "--dry-run", "--device", "cpu", "--warmup", "1", "--repeats", "2",
                 "--out", str(out)]) == 0
    return json.loads((out / "scale.json").read_text()), (out / "scale.md").read_text()


def _rows(results: dict, **match: str) -> list[dict]:
    return [r for r in results["rows"] if all(r[k] == v for k, v in match.items())]


def test_every_planned_row_has_figures_or_a_reason(dry_run) -> None:
    results, _ = dry_run
    assert results["schema"] == scale_report.SCHEMA and results["scale"] == "tiny" and results["complete"]
    assert set(results["models"]) == set(MODEL_NAMES)
    assert len(results["plan"]) == len(results["rows"]) == len(MODEL_NAMES) * len(Row)
    assert [p["expected_s"] for p in results["plan"]] == sorted(p["expected_s"] for p in results["plan"])
    for record in results["rows"]:
        assert record["expected_s"] > 0, record
        if record["status"] == Status.OK:
            repeats = scale.VAE_REPEATS if Row(record["row"]).is_vae else 2
            assert record["median_ms"] > 0 and len(record["samples_ms"]) == repeats, record
            assert record["peak_memory_mib"] > 0 and record["memory_kind"] and record["first_call_s"] > 0
        else:
            assert record["reason"], record


def test_cpu_rows_are_measured_or_refused_with_the_reason(dry_run) -> None:
    results, _ = dry_run
    for record in results["rows"]:
        row = Row(record["row"])
        if row in CPU_UNAVAILABLE:
            assert record["status"] == Status.UNAVAILABLE and CPU_UNAVAILABLE[row] in record["reason"], record
        elif row in CPU_SKIPPED:
            assert record["status"] == Status.SKIPPED and CPU_SKIPPED[row] in record["reason"], record
        else:
            assert record["status"] == Status.OK, record


def test_same_weights_and_inputs_give_the_same_output_in_every_eager_row(dry_run) -> None:
    results, _ = dry_run
    for model in MODEL_NAMES:
        for row in (Row.OURS, Row.DIFFUSERS, Row.CACHE_NEVER_SKIP):
            record = _rows(results, model=model, row=row.value)[0]
            # rebuilt or reused, through our loop or diffusers' direct call: bit for bit the bf16 reference
            assert record["rel_error_vs_bf16"] == 0.0, record
        assert _rows(results, model=model, row=Row.CACHE_NEVER_SKIP.value)[0]["skipped_steps"] == 0


def test_ratios_and_derived_figures_come_from_the_same_models_rows(dry_run) -> None:
    results, _ = dry_run
    for model in MODEL_NAMES:
        ours = _rows(results, model=model, row=Row.OURS.value)[0]
        diffusers = _rows(results, model=model, row=Row.DIFFUSERS.value)[0]
        assert ours["time_vs_ours"] == 1.0
        assert diffusers["time_vs_ours"] == pytest.approx(diffusers["median_ms"] / ours["median_ms"])
        assert ours["derived_request_s"] == pytest.approx(DERIVED_STEPS * ours["median_ms"] / 1000)
        passes = results["models"][model]["default_cfg_passes"]
        assert ours["derived_request_default_cfg_s"] == pytest.approx(passes * ours["derived_request_s"])
    targets = {(t["model"], t["target"]): t for t in results["targets"]}
    ours_vs_diffusers = targets[("flux1-dev", "our step time / diffusers' <= 1.0")]
    assert ours_vs_diffusers["value"] is not None and ours_vs_diffusers["met"] in (True, False)
    assert targets[("flux1-dev", "compile + FP8 step time / our eager bf16 <= 0.7")]["met"] is None


def test_markdown_states_scale_rows_targets_and_plan(dry_run) -> None:
    results, text = dry_run
    assert "TINY SCALE" in text and "random bf16 weights" in text and "not measured" in text
    for heading in ("## Models", "## Rows", "## Targets", "## Plan"):
        assert heading in text
    assert text.count("| qwen-image |") >= len(Row)
    assert results["command"].startswith("ditserve bench scale") and "--dry-run" in results["command"]
    assert any("image quality" in note for note in results["notes"])


def test_a_budget_skips_what_does_not_fit_and_writes_after_every_row(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    writes = []
    original = scale.write_results

    def counting(results, out_dir):
        writes.append(len(results.rows))
        return original(results, out_dir)

    monkeypatch.setattr(scale, "write_results", counting)
    out = tmp_path / "budget"
    assert main(["bench", "scale", "--dry-run", "--device", "cpu", "--models", "flux1-dev", "--rows",
                 "ours,vae_decode", "--budget-s", "0.001", "--out", str(out)]) == 0
    results = json.loads((out / "scale.json").read_text())
    assert [r["status"] for r in results["rows"]] == [Status.SKIPPED, Status.SKIPPED]
    assert all("--budget-s" in r["reason"] for r in results["rows"])
    # the plan alone, then after each row, then the final record
    assert writes == [0, 1, 2, 2]


def test_published_configs_have_the_published_sizes() -> None:
    assert tuple(MODELS) == MODEL_NAMES
    sizes = {name: workload(spec, Scale.FULL) for name, spec in MODELS.items()}
    # Qwen-Image 20 B, FLUX.1-dev 12 B, Wan2.2-TI2V 5 B (their model cards), counted on the meta device
    assert 20.0e9 < sizes["qwen-image"].parameters < 21.0e9
    assert 11.5e9 < sizes["flux1-dev"].parameters < 12.2e9
    assert 4.8e9 < sizes["wan2.2-ti2v-5b"].parameters < 5.2e9
    assert sizes["qwen-image"].image_tokens == sizes["flux1-dev"].image_tokens == 64 * 64
    assert sizes["wan2.2-ti2v-5b"].image_tokens == 21 * 22 * 40  # 81 frames, 704x1280, VAE 4x16x16, patch 1x2x2


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fp8_ignored_layers_name_layers_of_the_full_model(name: str) -> None:
    spec = MODELS[name]
    transformer = build_module(spec.transformer_class, spec.transformer_kwargs(Scale.FULL), torch.device("meta"),
                               torch.bfloat16, 0)
    assert unmatched_patterns(transformer, list(spec.fp8_ignored_layers)) == []


def test_planner_puts_compile_and_offload_after_eager_rows() -> None:
    bench_rows = scale.ScaleBench(scale.ScaleOptions(models=["qwen-image"], dry_run=True, device="cpu",
                                                     out=Path("unused")))
    costs = {p.row: p.expected_s for p in bench_rows.plan()}
    assert costs[Row.OURS] < costs[Row.COMPILE] <= costs[Row.COMPILE_FP8]
    gpu = {row: scale.expected_cost_s(row, workload(MODELS["qwen-image"], Scale.FULL), scale.GPU_COSTS, 7, 1)
           for row in Row}
    assert gpu[Row.OURS] < gpu[Row.LAYERWISE_OFFLOAD] and gpu[Row.OURS] < gpu[Row.COMPILE]


@pytest.mark.parametrize(("words", "flag"), [
    (["--models", "sdxl"], "--models"),
    (["--rows", "ours,warp"], "--rows"),
    (["--frames", "80"], "--frames"),
    (["--warmup", "0"], "--warmup"),
    (["--repeats", "60"], "--repeats"),
    (["--budget-s", "-1"], "--budget-s"),
])
def test_bad_options_name_the_option(words: list[str], flag: str, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "scale", "--dry-run", *words, "--out", str(tmp_path)]) == 2
    assert flag in capsys.readouterr().err


def test_full_scale_on_a_cpu_points_to_the_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "scale", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_bench_words_route_to_their_own_sub_commands() -> None:
    from ditserve.bench.cli import SCALE_COMMAND, SERVE_COMMAND, route_bench_subcommand
    from ditserve.entrypoints.cli import build_parser

    assert route_bench_subcommand(["bench", "scale", "--dry-run"]) == [SCALE_COMMAND, "--dry-run"]
    assert route_bench_subcommand(["bench", "serve", "m"]) == [SERVE_COMMAND, "m"]
    # a model called like a folder stays the bench's model argument
    assert route_bench_subcommand(["bench", "org/model", "--quick"]) == ["bench", "org/model", "--quick"]
    args = build_parser().parse_args(route_bench_subcommand(["bench", "scale", "--out", "x", "--rows", "ours"]))
    assert args.rows == "ours" and args.scale_prefix == ("ditserve", "bench", "scale")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_full_size_steps_and_decodes_hold_together_on_the_meta_device(name: str) -> None:
    """The published configs at the published output size, through our loop and the VAE, with shapes only
    (the meta device computes no values): what the GPU run will do, minus the arithmetic."""
    spec, meta = MODELS[name], torch.device("meta")
    loaded = build_pipeline(spec, Scale.FULL, meta, torch.bfloat16, scale.SEED)
    runner = ModelRunner(scale.lever_config(Row.OURS, spec, torch.device("cpu")), loaded)
    runner.decodes = False
    stepper = scale.LoopStepper(runner, scale.bench_request(loaded, spec, Scale.FULL))
    stepper()
    stepper()
    latents = torch.empty(vae_latent_shape(spec, Scale.FULL), device=meta, dtype=torch.bfloat16)
    with torch.no_grad():
        decoded = loaded.pipeline.vae.decode(latents, return_dict=False)[0]
    size = spec.output_size(Scale.FULL)
    assert decoded.shape[-2:] == (size.height, size.width)
    if size.frames > 1:
        assert decoded.shape[2] == size.frames
