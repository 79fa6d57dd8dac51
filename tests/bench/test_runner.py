import pytest

from ditserve.bench.plan import RunSpec, full_plan, quick_plan
from ditserve.bench.runner import Bench, BenchOptions, Progress, interleave, select_plan
from ditserve.bench.systems import BenchItem
from ditserve.errors import InvalidParameterError


def test_an_unregistered_backend_is_listed_with_the_reason() -> None:
    bench = Bench(BenchOptions(quick=True))
    bench.items = [BenchItem("a red circle")]
    bench.progress = Progress(0, enabled=False)
    record = bench._run_setting(RunSpec("ditserve", "Nope", "ours", {}, "no_such_backend"))
    assert record["status"] == "unavailable"
    assert "'no_such_backend' is not registered" in record["reason"]


def test_plans_start_with_both_baselines_and_alternate_ours_and_peers() -> None:
    for plan in (select_plan(BenchOptions(quick=True)), select_plan(BenchOptions())):
        assert [(s.system, s.group) for s in plan[:2]] == [("diffusers", "baseline"), ("ditserve", "baseline")]
        groups = [s.group for s in plan[2:6]]
        assert groups == ["ours", "peer", "ours", "peer"]
    assert len(select_plan(BenchOptions())) == len(full_plan())


def test_only_keeps_matching_settings_and_the_baselines() -> None:
    plan = select_plan(BenchOptions(quick=True, only=("teacache", "firstblock")))
    assert {s.method for s in plan} == {"uncached", "TeaCache", "FirstBlockCache"}


@pytest.mark.parametrize("plan", [quick_plan(), full_plan()])
def test_every_setting_is_distinct(plan: list[RunSpec]) -> None:
    assert len({spec.key() for spec in plan}) == len(plan)


def test_interleave_keeps_the_leftovers_of_the_longer_side() -> None:
    ours = [RunSpec("ditserve", f"o{i}", "ours") for i in range(2)]
    peers = [RunSpec("diffusers", f"p{i}", "peer") for i in range(3)]
    assert [s.method for s in interleave(ours, peers)] == ["o0", "p0", "o1", "p1", "p2"]


def test_diffusers_hooks_still_run_after_the_cache_dit_library_in_a_later_round(tiny_flux_dir: str) -> None:
    # cache_dit.disable_cache leaves FLUX's forward patched; the library therefore gets a pipeline of its own
    from ditserve.bench.runner import run_bench

    options = BenchOptions(model=tiny_flux_dir, steps=3, num_prompts=1, repeats=2, height=64, width=64, quick=True,
                           show_progress=False, only=("FirstBlockCache", "cache-dit DBCache"))
    records = {(r["system"], r["method"]): r for r in run_bench(options)["records"]}
    assert records[("cache-dit", "DBCache+TaylorSeer")]["status"] == "ok"
    assert records[("diffusers", "FirstBlockCache")]["status"] == "ok"
    assert records[("diffusers", "FirstBlockCache")]["samples"] == 2


def test_peers_are_searched_on_our_calibration_prompts_and_run_their_fronts(tiny_flux_dir: str, tmp_path) -> None:
    """--search-peers: each peer with knobs gets the search on the prompts and seeds our calibration searched on,
    and its rows are its front; our rows are our calibrated front, every searched knob set."""
    import json
    import shutil

    from ditserve.bench.peer_search import PEER_SPACES
    from ditserve.bench.runner import run_bench
    from ditserve.cache.calibration import CALIBRATION_FILE

    model = tmp_path / "flux"
    shutil.copytree(tiny_flux_dir, model)
    point = {"config": {"rel_l1_thresh": 2.0}, "work_fraction": 0.5, "psnr_mean": 30.0, "psnr_min": 28.0,
             "search_work_fraction": 0.5, "search_psnr_min": 29.0, "on_front": True}
    (model / CALIBRATION_FILE).write_text(json.dumps({
        "format": 2, "params": {"num_inference_steps": 3, "seed": 5}, "prompts": ["a red cat", "a blue dog"],
        "quality_table": {"tea_cache": {"knobs": ["rel_l1_thresh"], "search": {}, "points": [point]}}}))
    options = BenchOptions(model=str(model), steps=3, num_prompts=1, repeats=1, height=64, width=64,
                           show_progress=False, search_peers=4, only=("TeaCache", "FirstBlockCache"))
    results = run_bench(options)
    assert set(results["peer_search"]) == {f"{system} {method}" for system, method in PEER_SPACES}
    # the same budget of work as ours per knob count (spaces of 3 knobs or more get twice it); the last
    # generation may go past it by at most its own work
    assert all(record["work_spent"] < (8 if len(PEER_SPACES[tuple(name.split(" ", 1))].knobs) >= 3 else 4) + 1
               for name, record in results["peer_search"].items())
    assert results["peer_search"]["diffusers FirstBlockCache"]["work_spent"] < 4 + 1
    searched = results["peer_search"]["diffusers FirstBlockCache"]["front"]
    rows = [r for r in results["records"] if r["method"] == "FirstBlockCache"]
    # the rows are the points a target can resolve to: here (random weights skip nothing) the fastest one alone
    assert [r["config"] for r in rows] == [searched[0]["config"]] and searched[0]["psnr_min"] >= 45.0
    ours = [r for r in results["records"] if r["method"] == "TeaCache"]
    assert [r["config"] for r in ours] == [{"rel_l1_thresh": 2.0}]
    with pytest.raises(ValueError, match="steps"):
        run_bench(BenchOptions(**{**vars(options), "steps": 4}))


def test_the_edit_demo_is_benched_on_its_held_out_edits_with_diffusers_sized_as_we_are() -> None:
    """Each prompt is an edit with its input picture; diffusers' Kontext pipeline gets the folder's sizing
    (without it, it would resize the 128-pixel picture to a megapixel), so both uncached systems agree; diffusers'
    hooks that need a cache_context are reported unavailable on it."""
    from ditserve.bench.runner import run_bench
    from ditserve.demo.edit_evaluation import heldout_edit_inputs

    options = BenchOptions(model="ditserve-shapes-edit", steps=3, num_prompts=2, repeats=1, quick=True,
                           show_progress=False, only=("TeaCache", "FirstBlockCache", "MagCache"))
    results = run_bench(options)
    assert results["input_pictures"] and results["prompts"] == [e.instruction for e in heldout_edit_inputs(2, 0)[0]]
    assert results["adherence_measure"].startswith("pass rate")
    assert results["uncached_parity"]["psnr_min_db"] > 40
    records = [r for r in results["records"] if r["status"] == "ok"]
    assert {r["method"] for r in records} >= {"uncached", "TeaCache"}
    assert all(0 <= r["adherence"] <= 1 for r in records)  # the edit checker's pass rate
    # diffusers' Kontext pipeline calls its transformer outside a cache_context: the hooks that need one cannot
    # run there, the others do
    by_peer = {r["method"]: r for r in results["records"] if r["system"] == "diffusers"}
    assert by_peer["FirstBlockCache"]["status"] == "unavailable" and "cache_context" in by_peer["FirstBlockCache"]["reason"]
    assert by_peer["MagCache"]["status"] == "ok", by_peer["MagCache"]


def test_an_edit_model_without_the_bench_s_pictures_is_refused_naming_the_model() -> None:
    from ditserve.bench.runner import choose_items

    with pytest.raises(InvalidParameterError, match="input pictures") as error:
        choose_items("some/kontext-model", True, 2)
    assert error.value.param == "model"
    assert [item.image for item in choose_items("some/model", False, 2)] == [None, None]


def test_the_peer_search_makes_the_calibration_s_edits_again_and_checks_them_against_its_file() -> None:
    from types import SimpleNamespace

    from ditserve.cache.calibrate import item_label
    from ditserve.cache.calibrate_cli import demo_edit_items

    bench = Bench(BenchOptions())
    bench.loaded = SimpleNamespace(name="ditserve-shapes-edit", path="ditserve-shapes-edit")
    labels = [item_label(item) for item in demo_edit_items(2)]
    items = bench._calibration_items(labels)
    assert [item.prompt for item in items] == [label.split(" [input pictures")[0] for label in labels]
    assert all(item.image is not None for item in items)
    with pytest.raises(InvalidParameterError, match="cannot make again") as error:
        bench._calibration_items([labels[0], "make the red circle blue [input pictures 000000000000]"])
    assert error.value.param == "search_peers"


def test_a_video_model_is_benched_on_its_frames_equal_to_diffusers_and_cache_dit_as_the_library() -> None:
    """Wan (CFG by guidance_scale): the uncached videos equal diffusers' frame for frame; ours and the cache-dit
    library both know the guidance runs as its own pass and skip alike."""
    from ditserve.bench.runner import run_bench
    from ditserve.testing import tiny_pipeline_dir

    options = BenchOptions(model=tiny_pipeline_dir("wan"), steps=4, num_prompts=1, repeats=1, height=32, width=32,
                           num_frames=5, quick=True, show_progress=False, only=("cache-dit",))
    results = run_bench(options)
    assert results["sampling"]["num_frames"] == 5
    assert results["uncached_parity"]["psnr_min_db"] == 100.0
    records = {(r["system"], r["method"]): r for r in results["records"]}
    ours, library = records[("ditserve", "Cache-DiT DBCache+TaylorSeer")], records[("cache-dit", "DBCache+TaylorSeer")]
    for record in (ours, library):
        assert record["status"] == "ok" and record["config"]["enable_separate_cfg"] is True
        assert record["compute_fraction"] < 1 and record["psnr_db"] < 100
    assert ours["psnr_db"] == pytest.approx(library["psnr_db"])
    assert ours["compute_fraction"] == library["compute_fraction"]
