"""TeaCache on every supported family: exact when it may not skip, and its counted work matches its stats."""

from __future__ import annotations

import numpy as np
import pytest

from ditserve import Omni
from ditserve.testing import tiny_pipeline_dir
from tests.cache.helpers import count_block_work, media

FAMILY_PARAMS = {
    "qwen_image": {"height": 64, "width": 64},
    "z_image": {"height": 64, "width": 64},
    "wan": {"height": 32, "width": 32, "num_frames": 5},
}


@pytest.mark.parametrize("family", sorted(FAMILY_PARAMS))
def test_teacache_on_family(family: str) -> None:
    model = tiny_pipeline_dir(family)
    params = {**FAMILY_PARAMS[family], "num_inference_steps": 5, "seed": 2}
    with Omni(model) as omni:
        transformer = omni.engine.runner.model.pipeline.transformer
        with count_block_work(transformer) as one_step:
            omni.generate("a red cat", {**params, "num_inference_steps": 1})
        reference = omni.generate("a red cat", params)[0]
    with Omni(model, cache_backend="tea_cache", cache_config={"rel_l1_thresh": 0.0}) as omni:
        exact = omni.generate("a red cat", params)[0]
    with Omni(model, cache_backend="tea_cache", cache_config={"rel_l1_thresh": 10.0}) as omni:
        transformer = omni.engine.runner.model.pipeline.transformer
        with count_block_work(transformer) as counter:
            skipping = omni.generate("a red cat", params)[0]
        # two requests of different lengths in one batch: TeaCache computes each one's last step, so at the
        # short one's last step it computes while the long one skips: a sub-batch of the short one's rows
        pair_params = [{**params, "num_inference_steps": 7}, {**params, "num_inference_steps": 4, "seed": 3}]
        with count_block_work(transformer) as solo_work:
            solo = [omni.generate(p, sp)[0] for p, sp in zip(("a red cat", "a blue dog"), pair_params, strict=True)]
        with count_block_work(transformer) as pair_work:
            pair = omni.generate(["a red cat", "a blue dog"], pair_params)
    assert np.array_equal(media(exact), media(reference))
    stats = skipping.cache_stats
    calls_per_step = len(stats["branches"])  # one transformer call per guidance branch
    assert stats["skipped_steps"] > 0
    assert counter.calls == stats["computed_steps"] * one_step.calls // calls_per_step
    assert [o.timings["batch_size"] for o in pair] == [2, 2]
    assert pair_work.rows == solo_work.rows
    for alone, together in zip(solo, pair, strict=True):
        assert np.abs(media(alone).astype(int) - media(together).astype(int)).max() <= 1
