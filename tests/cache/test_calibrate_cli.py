"""``ditserve calibrate``: prompt sets, flags, the written file and the search log."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from ditserve.cache.calibrate import DEFAULT_BUDGET, default_budget, item_label, search_space
from ditserve.cache.calibrate_cli import DEMO_PROMPT_SEED, calibration_items, chosen_backends
from ditserve.cache.calibration import CALIBRATION_FILE
from ditserve.entrypoints.cli import main
from ditserve.errors import InvalidParameterError


def _args(**given) -> argparse.Namespace:
    return argparse.Namespace(**{"prompts": None, "model": "ditserve-shapes", "num_prompts": 4,
                                 "holdout_prompts": 4, "image": [], **given})


def test_the_demo_searches_and_holds_out_disjoint_prompts_that_the_bench_never_uses() -> None:
    from ditserve.demo import heldout_prompts

    search, holdout = calibration_items(_args())
    assert len(search) == 4 and len(holdout) == 4 and not set(search) & set(holdout)
    assert search + holdout == heldout_prompts(8, seed=DEMO_PROMPT_SEED)
    # the bench draws the demo's prompts with seed 0
    assert not set(search + holdout) & set(heldout_prompts(4, seed=0))


def test_the_edit_demo_calibrates_on_held_out_edits_each_with_its_own_input_picture() -> None:
    from ditserve.demo.edit_evaluation import source_images
    from ditserve.demo.edit_language import heldout_edits, parse_instruction

    search, holdout = calibration_items(_args(model="ditserve-shapes-edit", num_prompts=3, holdout_prompts=2))
    edits = heldout_edits(5, seed=DEMO_PROMPT_SEED)
    assert [item["prompt"] for item in search + holdout] == [edit.instruction for edit in edits]
    for item, edit, picture in zip(search + holdout, edits, source_images(edits), strict=True):
        assert np.array_equal(np.asarray(item["multi_modal_data"]["image"]), np.asarray(picture))
        assert parse_instruction(item["prompt"], edit.source) == edit  # the instruction is about its own picture
    with pytest.raises(InvalidParameterError, match="own input pictures") as error:
        calibration_items(_args(model="ditserve-shapes-edit", image=["x.png"]))
    assert error.value.param == "image"


def test_a_prompt_with_input_pictures_is_named_by_its_text_and_their_pixels() -> None:
    from PIL import Image

    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    label = item_label({"prompt": "make it blue", "multi_modal_data": {"image": red}})
    assert label.startswith("make it blue [input pictures ") and "0x" not in label  # no memory address
    assert label == item_label({"prompt": "make it blue", "multi_modal_data": {"image": [red.copy()]}})
    assert label != item_label({"prompt": "make it blue", "multi_modal_data": {"image": blue}})
    assert item_label("a red circle") == "a red circle"


def test_image_flag_gives_every_prompt_the_same_input_pictures() -> None:
    search, holdout = calibration_items(_args(model="some/model", num_prompts=1, holdout_prompts=1, image=["a.png"]))
    assert [item["multi_modal_data"]["image"] for item in search + holdout] == [["a.png"], ["a.png"]]


def test_spaces_of_many_knobs_get_twice_the_default_budget() -> None:
    assert default_budget(search_space("tea_cache")) == DEFAULT_BUDGET  # threshold and forecast order
    assert default_budget(search_space("mag_cache")) == default_budget(search_space("cache_dit")) == 2 * DEFAULT_BUDGET


def test_a_backends_start_points_seed_its_search_beside_its_threshold_seeds() -> None:
    from ditserve.cache.magcache import MagCacheBackend

    space = search_space("mag_cache")
    defaults = {knob.name: MagCacheBackend.defaults[knob.name] for knob in space.knobs}
    assert [s["magcache_thresh"] for s in space.seeds[:4]] == list(MagCacheBackend.search_seeds)
    assert space.seeds[4:] == tuple({**defaults, **p} for p in MagCacheBackend.search_start_points)
    assert all(set(seed) == set(defaults) for seed in space.seeds)


def test_too_few_prompts_and_unknown_backends_are_refused_naming_the_flag(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    with pytest.raises(InvalidParameterError, match="3 prompts") as error:
        calibration_items(_args(prompts=str(prompts), num_prompts=2, holdout_prompts=2))
    assert error.value.param == "prompts"
    with pytest.raises(InvalidParameterError, match="fast_cache") as error:
        chosen_backends("tea_cache,fast_cache")
    assert error.value.param == "backends"


def test_calibrate_writes_a_format_2_table_and_the_search_log(private_flux_dir: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "log.json"
    code = main(["calibrate", private_flux_dir, "--steps", "4", "--num-prompts", "2", "--height", "64", "--width", "64",
                 "--holdout-prompts", "1", "--budget", "3", "--backends", "tea_cache",
                 "--search-log", str(log)])
    assert code == 0
    stored = json.loads(Path(private_flux_dir, CALIBRATION_FILE).read_text())
    assert stored["format"] == 2 and len(stored["prompts"]) == 2 and len(stored["holdout_prompts"]) == 1
    table = stored["quality_table"]["tea_cache"]
    assert table["knobs"] == ["rel_l1_thresh", "forecast_order"]
    # the budget is denoising work: the last generation may take the search past it by at most its own work
    search = table["search"]
    assert search["work_spent"] < 3 + 1 and search["generations"] >= search["work_spent"]
    assert all(set(p["config"]) == {"rel_l1_thresh", "forecast_order"} for p in table["points"])
    logged = json.loads(log.read_text())["tea_cache"]
    assert len(logged) == table["search"]["evaluated"] and {e["status"] for e in logged} <= {
        "complete", "pruned", "out_of_budget", "infeasible"}
    assert "front over the search and held-out prompts" in capsys.readouterr().out
    # every searched point is a progress line at the default --log-level
    progress = [r for r in caplog.records if r.name == "ditserve.cache.search" and "rel_l1_thresh" in r.getMessage()]
    assert len(progress) == len(logged)
    # searching another backend the same way keeps this one's table; other params drop it (measured otherwise)
    same = ["calibrate", private_flux_dir, "--steps", "4", "--num-prompts", "2", "--height", "64", "--width", "64",
            "--holdout-prompts", "1", "--budget", "1"]
    assert main([*same, "--backends", "mag_cache"]) == 0
    assert set(json.loads(Path(private_flux_dir, CALIBRATION_FILE).read_text())["quality_table"]) == {
        "tea_cache", "mag_cache"}
    assert main([*same, "--seed", "3", "--backends", "mag_cache"]) == 0
    assert set(json.loads(Path(private_flux_dir, CALIBRATION_FILE).read_text())["quality_table"]) == {"mag_cache"}
    assert main(["calibrate", private_flux_dir, "--budget", "0"]) == 2
