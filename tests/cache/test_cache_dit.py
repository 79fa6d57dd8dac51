"""Cache-DiT through the cache-dit library: real skips in the statistics, clean recovery and removal."""

from __future__ import annotations

import numpy as np
import pytest

from ditserve import Omni
from ditserve.errors import CacheConfigError
from ditserve.testing import tiny_pipeline_dir
from tests.cache.helpers import count_block_work, media

PARAMS = {"num_inference_steps": 6, "height": 64, "width": 64, "max_sequence_length": 64, "seed": 1}
SKIPPING = {"residual_diff_threshold": 10.0, "max_warmup_steps": 1, "max_continuous_cached_steps": -1}


class FailOnce:
    """A forward pre-hook that raises on its n-th call, once."""

    def __init__(self, at_call: int) -> None:
        self.at_call, self.calls = at_call, 0

    def __call__(self, _module, _args) -> None:
        self.calls += 1
        if self.calls == self.at_call:
            raise RuntimeError("injected failure")


@pytest.fixture(scope="module")
def cache_dit_omni(tiny_flux_dir: str):
    omni = Omni(tiny_flux_dir, cache_backend="cache_dit", cache_config=SKIPPING)
    yield omni
    omni.close()


def test_library_reports_cached_steps_and_blocks(cache_dit_omni: Omni) -> None:
    transformer = cache_dit_omni.engine.runner.model.pipeline.transformer
    with count_block_work(transformer, "cache_dit") as counter:
        stats = cache_dit_omni.generate("a red cat", PARAMS)[0].cache_stats
    assert stats["backend"] == "cache_dit"
    assert stats["skipped_steps"] > 0 and stats["cached_blocks"] > 0
    assert stats["computed_blocks"] + stats["cached_blocks"] == PARAMS["num_inference_steps"] * 4
    # tiny FLUX: 2 dual + 2 single blocks, Fn=1: a cached step still runs the first block
    assert counter.calls > 0
    skipped = [d["step"] for d in stats["branches"]["cond"]["decisions"] if d["decision"] == "skip"]
    assert len(skipped) == stats["skipped_steps"]


def test_a_failed_run_leaves_nothing_behind(cache_dit_omni: Omni, tiny_flux_dir: str) -> None:
    transformer = cache_dit_omni.engine.runner.model.pipeline.transformer
    handle = transformer.transformer_blocks[0].register_forward_pre_hook(FailOnce(at_call=3))
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            cache_dit_omni.generate("a blue dog", PARAMS)
    finally:
        handle.remove()
    cache_dit_omni.engine.runner.cache.recover(cache_dit_omni.engine.runner.model.pipeline)
    after = cache_dit_omni.generate("a red cat", PARAMS)[0]
    with Omni(tiny_flux_dir, cache_backend="cache_dit", cache_config=SKIPPING) as fresh:
        expected = fresh.generate("a red cat", PARAMS)[0]
    assert np.array_equal(media(after), media(expected))
    assert after.cache_stats["branches"] == expected.cache_stats["branches"]


def test_disable_restores_the_uncached_transformer(tiny_flux_dir: str, flux_omni: Omni) -> None:
    reference = media(flux_omni.generate("a red cat", PARAMS)[0])
    with Omni(tiny_flux_dir, cache_backend="cache_dit", cache_config=SKIPPING) as omni:
        runner = omni.engine.runner
        assert not np.array_equal(media(omni.generate("a red cat", PARAMS)[0]), reference)
        runner.cache.disable(runner.model.pipeline)
        runner.cache = None
        assert np.array_equal(media(omni.generate("a red cat", PARAMS)[0]), reference)


def test_separate_cfg_state_follows_the_models_default_guidance(tiny_flux_dir: str, tmp_path) -> None:
    import json
    import shutil

    # plain FLUX runs no unconditional pass by default; a folder whose defaults turn true CFG on (like the
    # demo model) needs cache-dit to keep separate state for that pass
    with Omni(tiny_flux_dir, cache_backend="cache_dit") as omni:
        assert omni.engine.runner.cache.config["enable_separate_cfg"] is False
    guided = tmp_path / "guided-flux"
    shutil.copytree(tiny_flux_dir, guided)
    (guided / "ditserve_defaults.json").write_text(json.dumps(
        {"sampling_defaults": {"true_cfg_scale": 3.0, "negative_prompt": ""}}))
    with Omni(str(guided), cache_backend="cache_dit") as omni:
        assert omni.engine.runner.cache.config["enable_separate_cfg"] is True


@pytest.mark.parametrize(("family", "guided", "unguided"), [
    # Qwen-Image's headline setting: true CFG with a negative prompt, whose text is shorter than the prompt's
    ("qwen_image", {"true_cfg_scale": 4.0, "negative_prompt": "blue"}, {}),
    ("sd3", {"negative_prompt": "blue"}, {"guidance_scale": 1.0}),
], ids=["qwen_image", "sd3"])
def test_separate_cfg_state_follows_each_batch(family: str, guided: dict, unguided: dict) -> None:
    """The library tells the two guidance passes apart by call parity: a batch that guides needs it on, one that
    does not needs it off, whatever the model's default params say; both kinds run on one engine in turn."""
    params = {**PARAMS, "max_sequence_length": 32, "seed": 4}
    with Omni(tiny_pipeline_dir(family), cache_backend="cache_dit", cache_config=SKIPPING) as omni:
        with_cfg = omni.generate(["a small red circle at the top left", "a cat"], {**params, **guided})
        without_cfg = omni.generate("a small red circle at the top left", {**params, **unguided})[0]
        solo = omni.generate("a small red circle at the top left", {**params, **guided})[0]
    assert [o.timings["batch_size"] for o in with_cfg] == [2, 2]
    stats = with_cfg[0].cache_stats
    assert set(stats["branches"]) == {"cond", "uncond"}
    for branch in stats["branches"].values():
        assert branch["skipped"] > 0 and branch["computed"] + branch["skipped"] == PARAMS["num_inference_steps"]
    assert set(without_cfg.cache_stats["branches"]) == {"cond"}
    cond = without_cfg.cache_stats["branches"]["cond"]
    assert cond["skipped"] > 0 and cond["computed"] + cond["skipped"] == PARAMS["num_inference_steps"]
    assert np.abs(media(solo).astype(int) - media(with_cfg[0]).astype(int)).max() <= 1


def test_an_explicit_separate_cfg_that_contradicts_the_batch_is_refused(tiny_flux_dir: str) -> None:
    with Omni(tiny_flux_dir, cache_backend="cache_dit", cache_config={**SKIPPING, "enable_separate_cfg": False}) as omni:
        with pytest.raises(CacheConfigError, match="enable_separate_cfg=False, but these requests run"):
            omni.generate("a red cat", {**PARAMS, "true_cfg_scale": 3.0, "negative_prompt": "blue"})
        # the failed batch left nothing behind: an unguided one runs
        assert omni.generate("a red cat", PARAMS)[0].cache_stats["skipped_steps"] > 0
