"""TeaCache and MagCache on LTX-2, whose blocks carry the video and the audio stream: exact when they may not skip;
when they skip, the block work counted follows their statistics, both streams change, and requests of different
step counts batched together (a sub-batch at the short one's last step) equal their solo runs. Cache-DiT is
refused with its reason."""

from __future__ import annotations

import numpy as np
import pytest

from ditserve import Omni
from ditserve.errors import CacheConfigError
from ditserve.testing import tiny_pipeline_dir
from tests.cache.helpers import count_block_work, media

PARAMS = {"height": 32, "width": 32, "num_frames": 5, "max_sequence_length": 32, "num_inference_steps": 5, "seed": 2}
NEVER_SKIPPING = {"tea_cache": {"rel_l1_thresh": 0.0},
                  "mag_cache": {"mag_ratios": [1.0, 1.0], "magcache_thresh": 0.0, "retention_ratio": 0.0}}
SKIPPING = {"tea_cache": {"rel_l1_thresh": 10.0},
            "mag_cache": {"mag_ratios": [1.0, 1.0], "magcache_thresh": 1.0, "retention_ratio": 0.0}}


def audio(output) -> np.ndarray:
    return output.audio[0].samples


@pytest.fixture(scope="module")
def uncached(ltx2_omni: Omni):
    transformer = ltx2_omni.engine.runner.model.pipeline.transformer
    with count_block_work(transformer) as one_step:
        ltx2_omni.generate("a red cat", {**PARAMS, "num_inference_steps": 1})
    return ltx2_omni.generate("a red cat", PARAMS)[0], one_step.calls


@pytest.mark.parametrize("backend", sorted(SKIPPING))
def test_residual_caches_skip_both_streams_for_real(backend: str, uncached) -> None:
    reference, one_step_calls = uncached
    model = tiny_pipeline_dir("ltx2")
    with Omni(model, cache_backend=backend, cache_config=NEVER_SKIPPING[backend]) as omni:
        exact = omni.generate("a red cat", PARAMS)[0]
    with Omni(model, cache_backend=backend, cache_config=SKIPPING[backend]) as omni:
        transformer = omni.engine.runner.model.pipeline.transformer
        with count_block_work(transformer, backend) as counter:
            skipping = omni.generate("a red cat", PARAMS)[0]
        pair_params = [{**PARAMS, "num_inference_steps": 6}, {**PARAMS, "num_inference_steps": 4, "seed": 3}]
        with count_block_work(transformer, backend) as solo_work:
            solo = [omni.generate(p, sp)[0] for p, sp in zip(("a red cat", "a blue dog"), pair_params, strict=True)]
        with count_block_work(transformer, backend) as pair_work:
            pair = omni.generate(["a red cat", "a blue dog"], pair_params)
    assert np.array_equal(media(exact), media(reference)) and np.array_equal(audio(exact), audio(reference))
    stats = skipping.cache_stats
    # the tiny transformer lacks diffusers' STG block: no STG pass runs (test_ltx2 proves it)
    assert set(stats["branches"]) == {"cond", "uncond", "modality"}
    assert stats["skipped_steps"] > 0
    assert counter.calls == stats["computed_steps"] * one_step_calls // len(stats["branches"])
    # the skipped steps reused a residual on both streams: both moved away from the uncached run
    assert np.abs(media(skipping).astype(int) - media(reference).astype(int)).max() > 3
    assert np.abs(audio(skipping) - audio(reference)).max() > 1e-4
    assert [o.timings["batch_size"] for o in pair] == [2, 2]
    assert pair_work.rows == solo_work.rows
    for alone, together in zip(solo, pair, strict=True):
        assert np.abs(media(alone).astype(int) - media(together).astype(int)).max() <= 1
        assert np.abs(audio(alone) - audio(together)).max() <= 1e-5


def test_cache_dit_is_refused_with_its_reason() -> None:
    with pytest.raises(CacheConfigError, match="LTX-2.0's") as error:
        Omni(tiny_pipeline_dir("ltx2"), cache_backend="cache_dit")
    assert error.value.param == "cache_backend"
