"""Step caches on LongCat-Image: TeaCache, MagCache and Cache-DiT really skip (the block work counted follows their
statistics), are exact when they may not skip, keep batched equal to solo; TeaCache skips on the edit model too;
and ``ditserve calibrate`` fits the family and the caches start from its file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ditserve import Omni
from ditserve.cache.calibrate import calibrate
from ditserve.cache.search import Knob, SearchSpace
from ditserve.cache.spec import cache_spec_for
from ditserve.errors import CacheConfigError
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.common import folder_with_defaults
from tests.cache.helpers import WorkCounter, count_block_work, media

PARAMS = {"height": 64, "width": 64, "num_inference_steps": 5, "seed": 2}
#: per backend: a config under which it may not skip, and one under which it skips every step it may
NEVER_SKIPPING = {"tea_cache": {"rel_l1_thresh": 0.0},
                  "mag_cache": {"mag_ratios": [1.0, 1.0], "magcache_thresh": 0.0, "retention_ratio": 0.0},
                  "cache_dit": {"residual_diff_threshold": 0.0, "max_warmup_steps": 1}}
SKIPPING = {"tea_cache": {"rel_l1_thresh": 10.0},
            "mag_cache": {"mag_ratios": [1.0, 1.0], "magcache_thresh": 1.0, "retention_ratio": 0.0},
            "cache_dit": {"residual_diff_threshold": 10.0, "max_warmup_steps": 1, "max_continuous_cached_steps": -1}}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny pipeline without prompt rewriting (the prompts then matter, and runs are fast)."""
    return folder_with_defaults(tiny_pipeline_dir("longcat_image"), tmp_path_factory.mktemp("longcat") / "plain",
                                {"enable_prompt_rewrite": False})


@pytest.fixture(scope="module")
def uncached(folder: str) -> np.ndarray:
    with Omni(folder) as omni:
        return media(omni.generate("a red cat", PARAMS)[0])


def count_last_block(transformer: torch.nn.Module, backend: str) -> tuple[WorkCounter, list, int]:
    """A counter on the Linears of the last cached block (cache-dit always runs the first one: F1B0)."""
    last_block = cache_spec_for(transformer, backend).blocks(transformer)[-1][0]
    linears = [m for m in last_block.modules() if isinstance(m, torch.nn.Linear)]
    counter = WorkCounter()
    return counter, [m.register_forward_pre_hook(counter) for m in linears], len(linears)


@pytest.mark.parametrize("backend", sorted(SKIPPING))
def test_each_backend_skips_for_real_and_batched_equals_solo(folder: str, uncached: np.ndarray,
                                                             backend: str) -> None:
    with Omni(folder, cache_backend=backend, cache_config=NEVER_SKIPPING[backend]) as omni:
        exact = omni.generate("a red cat", PARAMS)[0]
    # both guided (LongCat guides by default), with equal params but prompt and seed: one cohort under cache-dit
    pair = [("a red cat", PARAMS), ("a blue dog", {**PARAMS, "seed": 3})]
    with Omni(folder, cache_backend=backend, cache_config=SKIPPING[backend]) as omni:
        counter, handles, linears = count_last_block(omni.engine.runner.model.pipeline.transformer, backend)
        try:
            solo = [omni.generate(prompt, params)[0] for prompt, params in pair]
            solo_calls, solo_rows = counter.calls, counter.rows
            counter.calls = counter.rows = 0
            together = omni.generate([prompt for prompt, _ in pair], [params for _, params in pair])
        finally:
            for handle in handles:
                handle.remove()
    assert np.array_equal(media(exact), uncached)
    stats = solo[0].cache_stats
    assert set(stats["branches"]) == {"cond", "uncond"}
    assert stats["skipped_steps"] > 0
    assert solo_calls == linears * sum(o.cache_stats["computed_steps"] for o in solo)
    if backend == "cache_dit":  # one cohort: its requests share every decision, so their rows run together
        assert counter.calls == linears * together[0].cache_stats["computed_steps"]
    else:  # decided per request: a request's rows run when it computes, alone or with its mate's
        assert counter.rows == solo_rows
    assert [o.timings["batch_size"] for o in together] == [2, 2]
    for alone, batched in zip(solo, together, strict=True):
        assert np.abs(media(alone).astype(int) - media(batched).astype(int)).max() <= 1
    # skipping changed the output: the equalities above are not those of an idle cache
    assert np.abs(media(solo[0]).astype(int) - uncached.astype(int)).max() > 3


def test_teacache_skips_on_the_edit_model() -> None:
    """The edit model's input-image tokens go through the same blocks: TeaCache reads and skips them alike."""
    image = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    request = {"prompt": "turn this into a painting", "multi_modal_data": {"image": image}}
    model = tiny_pipeline_dir("longcat_image_edit")
    with Omni(model) as omni:
        multiple = omni.engine.adapter.size_multiple
        params = {"height": multiple, "width": 2 * multiple, "num_inference_steps": 5, "seed": 1}
        transformer = omni.engine.runner.model.pipeline.transformer
        with count_block_work(transformer) as one_step:
            omni.generate(request, {**params, "num_inference_steps": 1})
    with Omni(model, cache_backend="tea_cache", cache_config=SKIPPING["tea_cache"]) as omni:
        with count_block_work(omni.engine.runner.model.pipeline.transformer) as counter:
            stats = omni.generate(request, params)[0].cache_stats
    assert stats["skipped_steps"] > 0
    assert counter.calls == stats["computed_steps"] * one_step.calls // len(stats["branches"])


def test_calibration_serves_longcat(folder: str, tmp_path: Path) -> None:
    """No published coefficients: calibration fits them per guidance branch, and MagCache, which needs ratios,
    starts from them."""
    model_dir = folder_with_defaults(folder, tmp_path / "longcat", {"enable_prompt_rewrite": False})
    params = {**PARAMS, "num_inference_steps": 4}
    with pytest.raises(CacheConfigError, match="ditserve calibrate"):
        Omni(model_dir, cache_backend="mag_cache")
    space = SearchSpace((Knob("rel_l1_thresh", (0.0, 0.01)),), ({"rel_l1_thresh": 0.0},))
    with Omni(model_dir) as omni:
        data = calibrate(omni, ["a red cat"], ["a blue dog"], params, ["tea_cache"], budget=1,
                         spaces={"tea_cache": space}).data
    assert data["transformer_class"] == "LongCatImageTransformer2DModel"
    assert set(data["mag_cache"]["mag_ratios"]) == {"cond", "uncond"}
    assert all(len(ratios) == 4 for ratios in data["mag_cache"]["mag_ratios"].values())
    assert data["quality_table"]["tea_cache"]["points"][0]["psnr_min"] == 100.0
    with Omni(model_dir, cache_backend="mag_cache") as omni:
        stats = omni.generate("a red cat", params)[0].cache_stats
    assert stats["config"]["mag_ratios_source"].startswith("calibration file")
