"""Cache configs: unknown names and keys, unsupported models, quality targets resolved from calibration."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ditserve import Omni
from ditserve.cache.calibrate import calibrate
from ditserve.cache.calibration import CALIBRATION_FILE, load_calibration
from ditserve.cache.quality_table import choose_point, quality_table
from ditserve.cache.search import Knob, SearchSpace
from ditserve.cache.selector import build_cache_backend
from ditserve.cache.spec import cache_spec_for
from ditserve.errors import CacheConfigError, UnknownKeyError
from ditserve.testing import tiny_pipeline_dir

PARAMS = {"num_inference_steps": 6, "height": 64, "width": 64, "max_sequence_length": 64}


def test_unknown_backend_lists_the_allowed_ones() -> None:
    with pytest.raises(CacheConfigError, match=r"'tea_cache'") as error:
        build_cache_backend("fast_cache", {})
    assert "cache_dit" in str(error.value) and "mag_cache" in str(error.value)


@pytest.mark.parametrize("backend", ["tea_cache", "mag_cache", "cache_dit"])
def test_unknown_config_key_lists_the_allowed_ones(backend: str) -> None:
    with pytest.raises(UnknownKeyError, match="rel_l1_treshold") as error:
        build_cache_backend(backend, {"rel_l1_treshold": 0.2})
    assert "target_psnr" in str(error.value)


@pytest.mark.parametrize(("config", "field"), [({"rel_l1_thresh": -1}, "rel_l1_thresh"),
                                               ({"quality": "extreme"}, "quality"),
                                               ({"target_psnr": 30, "rel_l1_thresh": 0.1}, "rel_l1_thresh"),
                                               ({"forecast_order": 2}, "forecast_order"),
                                               ({"forecast_order": True}, "forecast_order"),
                                               ({"forecast_order": 1.0}, "forecast_order")])
def test_bad_values_name_their_field(config: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build_cache_backend("tea_cache", config)


def test_a_transformer_without_a_cache_spec_is_refused_naming_the_supported_ones() -> None:
    # every tiny pipeline here has a spec now; the lookup that enable() (at Omni(...)) makes is the same
    with pytest.raises(CacheConfigError, match="cannot serve Linear") as error:
        cache_spec_for(torch.nn.Linear(2, 2), "tea_cache")
    assert "FluxTransformer2DModel" in str(error.value)


def test_cache_dit_rejects_more_compute_blocks_than_the_model_has(tiny_flux_dir: str) -> None:
    with pytest.raises(CacheConfigError, match="Fn_compute_blocks"):
        Omni(tiny_flux_dir, cache_backend="cache_dit", cache_config={"Fn_compute_blocks": 8})


def _write_table(model_dir: str, rows: list[dict]) -> None:
    table = {"knob": "rel_l1_thresh", "rows": rows}
    Path(model_dir, CALIBRATION_FILE).write_text(json.dumps({"format": 1, "quality_table": {"tea_cache": table}}))


def test_target_psnr_resolves_to_the_fastest_setting_that_met_it(private_flux_dir: str) -> None:
    _write_table(private_flux_dir, [
        {"value": 0.1, "work_fraction": 0.8, "speedup": 1.2, "psnr_mean": 40.0, "psnr_min": 38.0},
        {"value": 0.4, "work_fraction": 0.5, "speedup": 1.9, "psnr_mean": 33.0, "psnr_min": 31.0},
        {"value": 0.8, "work_fraction": 0.3, "speedup": 3.0, "psnr_mean": 28.0, "psnr_min": 26.0}])
    with Omni(private_flux_dir, cache_backend="tea_cache", cache_config={"quality": "balanced"}) as omni:
        stats = omni.generate("a red cat", {**PARAMS, "seed": 1})[0].cache_stats
    assert stats["config"]["rel_l1_thresh"] == 0.4
    assert stats["resolved_from"]["target_psnr"] == 30.0
    assert stats["resolved_from"]["table_psnr_min"] == 31.0
    backend = build_cache_backend("tea_cache", {"target_psnr": 37})
    backend.resolve_quality_target(private_flux_dir)
    assert backend.config["rel_l1_thresh"] == 0.1


def test_unreachable_target_names_the_best_reachable_quality(private_flux_dir: str) -> None:
    _write_table(private_flux_dir, [
        {"value": 0.1, "work_fraction": 0.8, "speedup": 1.2, "psnr_mean": 40.0, "psnr_min": 38.5}])
    with pytest.raises(CacheConfigError, match=r"38\.50 dB"):
        Omni(private_flux_dir, cache_backend="tea_cache", cache_config={"target_psnr": 45})


def test_target_without_a_calibration_says_to_calibrate(private_flux_dir: str) -> None:
    with pytest.raises(CacheConfigError, match="ditserve calibrate"):
        Omni(private_flux_dir, cache_backend="tea_cache", cache_config={"target_psnr": 30})


def test_calibration_fits_writes_and_is_picked_up(private_flux_dir: str) -> None:
    spaces = {"tea_cache": SearchSpace((Knob("rel_l1_thresh", (0.0, 5.0)),), ({"rel_l1_thresh": 0.0},)),
              "mag_cache": SearchSpace((Knob("magcache_thresh", (0.0, 0.01)),), ({"magcache_thresh": 0.0},))}
    with Omni(private_flux_dir) as omni:
        run = calibrate(omni, ["a red cat", "a blue dog"], ["a green cat"], {**PARAMS, "seed": 0},
                        ["tea_cache", "mag_cache"], budget=20, spaces=spaces)
    assert run.path == str(Path(private_flux_dir, CALIBRATION_FILE))
    stored = load_calibration(private_flux_dir)
    assert stored["format"] == 2 and stored["holdout_prompts"] == ["a green cat"]
    assert stored["tea_cache"]["coefficients"] == run.data["tea_cache"]["coefficients"]
    assert len(stored["mag_cache"]["mag_ratios"]["cond"]) == PARAMS["num_inference_steps"]
    points = stored["quality_table"]["tea_cache"]["points"]
    # the uncached end and the skipping end are both on the front, measured on the held-out prompt
    assert [p["config"]["rel_l1_thresh"] for p in points] == [5.0, 0.0]
    assert points[1]["work_fraction"] == 1.0 and points[1]["psnr_min"] == 100.0
    assert points[0]["work_fraction"] < 1.0 and points[0]["psnr_min"] < 100.0 and points[0]["on_front"]
    assert stored["quality_table"]["tea_cache"]["search"]["generations"] == 4
    with Omni(private_flux_dir, cache_backend="mag_cache") as omni:
        stats = omni.generate("a red cat", {**PARAMS, "seed": 0})[0].cache_stats
    assert stats["config"]["mag_ratios_source"].startswith("calibration file")
    with Omni(private_flux_dir, cache_backend="tea_cache", cache_config={"target_psnr": 99}) as omni:
        stats = omni.generate("a red cat", {**PARAMS, "seed": 0})[0].cache_stats
    assert stats["config"]["rel_l1_thresh"] == 0.0
    assert stats["config"]["coefficients_source"].startswith("calibration file")


def _layered_items() -> list[dict]:
    """Qwen-Image-Layered's calibration prompts: each decomposes an input image, guided against a negative prompt."""
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 4), dtype=np.uint8), "RGBA")
    return [{"prompt": p, "negative_prompt": " ", "multi_modal_data": {"image": image}} for p in ("a red cat", "a dog")]


#: families with no published coefficients: their transformer, their request params, and their calibration
#: prompts (None: plain text)
CALIBRATED = {
    "sd3": ("SD3Transformer2DModel", {**PARAMS, "max_sequence_length": 32}, None),
    "ovis_image": ("OvisImageTransformer2DModel", {**PARAMS, "max_sequence_length": 128}, None),
    "qwen_image_layered": ("QwenImageTransformer2DModel", {"layers": 1, "true_cfg_scale": 4.0}, _layered_items),
}


@pytest.mark.parametrize("family", sorted(CALIBRATED))
def test_calibration_serves_families_without_published_coefficients(family: str, tmp_path: Path) -> None:
    """Calibration fits their coefficients per guidance branch, and MagCache, which needs ratios, starts from
    them."""
    transformer_class, options, make_items = CALIBRATED[family]
    items = make_items() if make_items is not None else ["a red cat", "a blue dog"]
    model_dir = tmp_path / family
    shutil.copytree(tiny_pipeline_dir(family), model_dir)
    params = {**options, "num_inference_steps": 4, "seed": 0}
    with pytest.raises(CacheConfigError, match="ditserve calibrate"):
        Omni(str(model_dir), cache_backend="mag_cache")
    space = SearchSpace((Knob("residual_diff_threshold", (0.0, 0.01)),), ({"residual_diff_threshold": 0.0},))
    with Omni(str(model_dir)) as omni:
        data = calibrate(omni, items[:1], items[1:], params, ["cache_dit"], budget=2,
                         spaces={"cache_dit": space}).data
    assert data["transformer_class"] == transformer_class
    assert set(data["mag_cache"]["mag_ratios"]) == {"cond", "uncond"}
    assert data["quality_table"]["cache_dit"]["points"][0]["psnr_min"] == 100.0
    with Omni(str(model_dir), cache_backend="mag_cache") as omni:
        stats = omni.generate(items[0], params)[0].cache_stats
    assert stats["config"]["mag_ratios_source"].startswith("calibration file")


def _kontext_items() -> list[dict]:
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    return [{"prompt": p, "multi_modal_data": {"image": image}} for p in ("a red cat", "a blue dog")]


#: families whose calibration goes through TeaCache's search: Cache-DiT is refused on LTX-2, and Kontext's
#: MagCache already starts from FLUX's published ratios; (tiny pipeline, request params, calibration prompts,
#: the guidance branches MagCache gets ratios for)
CALIBRATED_BY_TEACACHE = {
    "ltx2": ({"num_inference_steps": 4, "height": 32, "width": 32, "num_frames": 9},
             lambda: ["a red cat", "a blue dog"], {"cond", "uncond", "modality"}),
    "flux_kontext": ({"num_inference_steps": 4, "height": 32, "width": 32}, _kontext_items, {"cond"}),
}


@pytest.mark.parametrize("family", sorted(CALIBRATED_BY_TEACACHE))
def test_calibration_serves_ltx2_and_kontext(family: str, tmp_path: Path) -> None:
    """Calibration runs their requests (LTX-2's video and audio, Kontext's input image), fits MagCache ratios for
    every guidance pass they run, and MagCache starts from the file it wrote."""
    options, make_items, branches = CALIBRATED_BY_TEACACHE[family]
    items = make_items()
    model_dir = tmp_path / family
    shutil.copytree(tiny_pipeline_dir(family), model_dir)
    params = {**options, "seed": 0}
    space = SearchSpace((Knob("rel_l1_thresh", (0.0, 0.01)),), ({"rel_l1_thresh": 0.0},))
    with Omni(str(model_dir)) as omni:
        data = calibrate(omni, items[:1], items[1:], params, ["tea_cache"], budget=1,
                         spaces={"tea_cache": space}).data
    assert set(data["mag_cache"]["mag_ratios"]) == branches
    assert data["quality_table"]["tea_cache"]["points"][0]["psnr_min"] == 100.0
    with Omni(str(model_dir), cache_backend="mag_cache") as omni:
        stats = omni.generate(items[0], params)[0].cache_stats
    assert stats["config"]["mag_ratios_source"].startswith("calibration file")


def test_calibration_serves_wan_image_to_video(tmp_path: Path) -> None:
    """Wan2.2 I2V-A14B: calibration runs its prompts with their input image, fits each expert's guidance branches,
    and MagCache starts from the ratios it wrote."""
    from PIL import Image

    model_dir = tmp_path / "wan_i2v_a14b"
    shutil.copytree(tiny_pipeline_dir("wan_i2v_a14b"), model_dir)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    items = [{"prompt": p, "multi_modal_data": {"image": image}} for p in ("a red cat", "a blue dog")]
    params = {"num_inference_steps": 5, "height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 32,
              "seed": 0}
    space = SearchSpace((Knob("rel_l1_thresh", (0.0, 0.01)),), ({"rel_l1_thresh": 0.0},))
    with Omni(str(model_dir)) as omni:
        data = calibrate(omni, items[:1], items[1:], params, ["tea_cache"], budget=1,
                         spaces={"tea_cache": space}).data
    ratios = data["mag_cache"]["mag_ratios"]
    assert set(ratios) == {"cond", "uncond", "transformer_2:cond", "transformer_2:uncond"}
    # one ratio per step of the request for each expert: 1.0 where the other expert runs and at its own first
    # step, so the high-noise expert's are measured at its steps after the first, the low-noise one's after
    for branch in ("cond", "uncond"):
        high, low = ratios[branch], ratios[f"transformer_2:{branch}"]
        assert len(high) == len(low) == 5
        measured_high = [step for step, r in enumerate(high) if r != 1.0]
        measured_low = [step for step, r in enumerate(low) if r != 1.0]
        assert measured_high and measured_low and max(measured_high) + 1 < min(measured_low)
    assert data["quality_table"]["tea_cache"]["points"][0]["psnr_min"] == 100.0
    with Omni(str(model_dir), cache_backend="mag_cache") as omni:
        stats = omni.generate(items[0], params)[0].cache_stats
    assert stats["config"]["mag_ratios_source"].startswith("calibration file")


def _write_v2_mag_table(model_dir: str) -> None:
    def point(thresh: float, k: int, retention: float, work: float, psnr_min: float, on_front: bool) -> dict:
        return {"config": {"magcache_thresh": thresh, "magcache_K": k, "retention_ratio": retention},
                "work_fraction": work, "psnr_mean": psnr_min + 3, "psnr_min": psnr_min,
                "search_work_fraction": work, "search_psnr_min": psnr_min + 1, "on_front": on_front}

    table = {"knobs": ["magcache_thresh", "magcache_K", "retention_ratio"], "search": {"generations": 9},
             "points": [point(0.24, 8, 0.05, 0.25, 29.0, True), point(0.12, 6, 0.1, 0.3, 32.0, True),
                        point(0.06, 2, 0.2, 0.45, 40.0, True), point(0.12, 2, 0.2, 0.4, 31.0, False)]}
    Path(model_dir, CALIBRATION_FILE).write_text(json.dumps({"format": 2, "quality_table": {"mag_cache": table}}))


def test_a_target_sets_every_searched_knob_from_the_fastest_front_point_meeting_it(private_flux_dir: str) -> None:
    _write_v2_mag_table(private_flux_dir)
    with Omni(private_flux_dir, cache_backend="mag_cache", cache_config={"quality": "balanced"}) as omni:
        stats = omni.generate("a red cat", {**PARAMS, "seed": 1})[0].cache_stats
    assert (stats["config"]["magcache_thresh"], stats["config"]["magcache_K"],
            stats["config"]["retention_ratio"]) == (0.12, 6, 0.1)
    assert stats["resolved_from"]["config"]["magcache_K"] == 6 and stats["resolved_from"]["table_psnr_min"] == 32.0


def test_a_hand_given_knob_wins_and_the_target_picks_among_points_measured_with_it(private_flux_dir: str) -> None:
    _write_v2_mag_table(private_flux_dir)
    backend = build_cache_backend("mag_cache", {"target_psnr": 30, "magcache_K": 2})
    backend.resolve_quality_target(private_flux_dir)
    # the off-front point with K=2 is faster than the front one with K=2 and still meets 30 dB
    assert (backend.config["magcache_thresh"], backend.config["magcache_K"]) == (0.12, 2)
    with pytest.raises(CacheConfigError, match=r"magcache_K.*measured values") as error:
        build_cache_backend("mag_cache", {"target_psnr": 30, "magcache_K": 5}).resolve_quality_target(private_flux_dir)
    assert error.value.param == "magcache_K"
    # an option the search does not move is left alone and does not restrict the choice
    backend = build_cache_backend("mag_cache", {"target_psnr": 30, "mag_ratios": [1.0, 0.9, 0.8]})
    backend.resolve_quality_target(private_flux_dir)
    assert backend.config["magcache_K"] == 6


def test_a_calibration_file_of_an_unknown_format_is_refused_naming_the_field(private_flux_dir: str) -> None:
    Path(private_flux_dir, CALIBRATION_FILE).write_text(json.dumps({"format": 9, "quality_table": {}}))
    with pytest.raises(CacheConfigError, match="format 9") as error:
        build_cache_backend("tea_cache", {"target_psnr": 30}).resolve_quality_target(private_flux_dir)
    assert error.value.param == "format"


def test_a_point_is_judged_by_its_worst_prompt_over_the_held_out_and_the_search_prompts() -> None:
    def point(work: float, held_out_worst: float, search_worst: float) -> dict:
        return {"config": {"rel_l1_thresh": work}, "work_fraction": work, "psnr_mean": 40.0,
                "psnr_min": held_out_worst, "search_work_fraction": work + 0.02, "search_psnr_min": search_worst,
                "on_front": True}

    # the fast point's held-out prompts were easy (31 dB) but a search prompt fell to 28: it misses 30 dB
    data = {"format": 2, "quality_table": {"tea_cache": {"knobs": ["rel_l1_thresh"], "search": {}, "points": [
        point(0.15, 31.0, 28.0), point(0.2, 33.0, 32.0)]}}}
    table = quality_table(data, "tea_cache")
    assert [p.worst_db for p in table.points] == [28.0, 32.0] and table.points[0].work == pytest.approx(0.16)
    assert choose_point(table, 30.0, {}).config == {"rel_l1_thresh": 0.2}
    # stored front marks are redone by the rule targets resolve by
    data["quality_table"]["tea_cache"]["points"].append(point(0.3, 27.0, 27.0))
    assert [p.on_front for p in quality_table(data, "tea_cache").points] == [True, True, False]


def test_format_1_rows_become_single_knob_points_with_their_front_marked() -> None:
    rows = [{"value": 0.1, "work_fraction": 0.8, "speedup": 1.0, "psnr_mean": 40.0, "psnr_min": 38.0},
            {"value": 0.2, "work_fraction": 0.8, "speedup": 1.0, "psnr_mean": 35.0, "psnr_min": 33.0},
            {"value": 0.4, "work_fraction": 0.5, "speedup": 1.0, "psnr_mean": 33.0, "psnr_min": 31.0}]
    table = quality_table({"format": 1, "quality_table": {"tea_cache": {"knob": "rel_l1_thresh", "rows": rows}}},
                          "tea_cache")
    assert table.knobs == ("rel_l1_thresh",)
    assert [(p.config, p.on_front) for p in table.points] == [
        ({"rel_l1_thresh": 0.4}, True), ({"rel_l1_thresh": 0.1}, True), ({"rel_l1_thresh": 0.2}, False)]


def test_a_bad_forecast_order_names_the_allowed_values() -> None:
    with pytest.raises(CacheConfigError, match=r"forecast_order.*0: 'reuse', 1: 'linear'") as error:
        build_cache_backend("tea_cache", {"forecast_order": 3})
    assert error.value.param == "forecast_order"


def test_a_target_sets_the_forecast_order_from_the_file(private_flux_dir: str) -> None:
    def point(thresh: float, order: int, work: float, psnr_min: float) -> dict:
        return {"config": {"rel_l1_thresh": thresh, "forecast_order": order}, "work_fraction": work,
                "psnr_mean": psnr_min + 3, "psnr_min": psnr_min, "search_work_fraction": work,
                "search_psnr_min": psnr_min, "on_front": True}

    table = {"knobs": ["rel_l1_thresh", "forecast_order"], "search": {"generations": 4},
             "points": [point(0.4, 1, 0.18, 31.0), point(0.25, 0, 0.21, 32.0), point(0.1, 0, 0.4, 38.0)]}
    Path(private_flux_dir, CALIBRATION_FILE).write_text(json.dumps({"format": 2, "quality_table": {"tea_cache": table}}))
    loaded = quality_table(load_calibration(private_flux_dir), "tea_cache")
    assert loaded.knobs == ("rel_l1_thresh", "forecast_order")
    assert loaded.to_json() == table
    with Omni(private_flux_dir, cache_backend="tea_cache", cache_config={"target_psnr": 30}) as omni:
        stats = omni.generate("a red cat", {**PARAMS, "seed": 1})[0].cache_stats
    assert (stats["config"]["rel_l1_thresh"], stats["config"]["forecast_order"]) == (0.4, 1)
    # a hand-given order restricts the choice to the points measured with it
    backend = build_cache_backend("tea_cache", {"target_psnr": 30, "forecast_order": 0})
    backend.resolve_quality_target(private_flux_dir)
    assert backend.config["rel_l1_thresh"] == 0.25
