"""TeaCache and MagCache on tiny FLUX: exactness when nothing may skip, real skips, no leaks, batching; TeaCache
with residual forecasting."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from ditserve import Omni, OmniDiffusionSamplingParams
from ditserve.testing.compare import max_abs_diff
from tests.cache.helpers import count_block_work, media

PARAMS = {"num_inference_steps": 6, "height": 64, "width": 64, "max_sequence_length": 64}
#: random weights change a lot between steps: only very loose settings skip (see platform notes)
SKIPPING = {"tea_cache": {"rel_l1_thresh": 5.0}, "mag_cache": {"magcache_thresh": 2.0, "retention_ratio": 0.0}}
NO_SKIP = {"tea_cache": {"rel_l1_thresh": 0.0}, "mag_cache": {"magcache_thresh": 0.0}}


@pytest.fixture(scope="module")
def reference(flux_omni: Omni) -> np.ndarray:
    return media(flux_omni.generate("a red cat", {**PARAMS, "seed": 1})[0])


@pytest.fixture(scope="module")
def work_per_loop(flux_omni: Omni) -> int:
    """Counted inner work of one uncached transformer call."""
    with count_block_work(flux_omni.engine.runner.model.pipeline.transformer) as counter:
        flux_omni.generate("a red cat", {**PARAMS, "num_inference_steps": 1, "seed": 1})
    assert counter.calls > 0
    return counter.calls


@pytest.fixture(scope="module", params=["tea_cache", "mag_cache"])
def skipping_omni(request, tiny_flux_dir: str):
    omni = Omni(tiny_flux_dir, cache_backend=request.param, cache_config=SKIPPING[request.param], max_batch_size=4)
    yield omni
    omni.close()


@pytest.mark.parametrize("backend", ["tea_cache", "mag_cache"])
def test_config_that_forbids_skipping_is_bitwise_uncached(backend: str, tiny_flux_dir: str,
                                                          reference: np.ndarray) -> None:
    with Omni(tiny_flux_dir, cache_backend=backend, cache_config=NO_SKIP[backend]) as omni:
        output = omni.generate("a red cat", {**PARAMS, "seed": 1})[0]
    assert np.array_equal(media(output), reference)
    assert output.cache_stats["skipped_steps"] == 0
    assert output.cache_stats["computed_steps"] == PARAMS["num_inference_steps"]


def test_skips_are_real_and_match_the_statistics(skipping_omni: Omni, reference: np.ndarray,
                                                 work_per_loop: int) -> None:
    transformer = skipping_omni.engine.runner.model.pipeline.transformer
    with count_block_work(transformer) as counter:
        output = skipping_omni.generate("a red cat", {**PARAMS, "seed": 1})[0]
    stats = output.cache_stats
    assert stats["skipped_steps"] > 0, stats
    assert stats["computed_steps"] + stats["skipped_steps"] == PARAMS["num_inference_steps"]
    assert counter.calls == stats["computed_steps"] * work_per_loop
    decisions = stats["branches"]["cond"]["decisions"]
    assert [d["step"] for d in decisions] == list(range(PARAMS["num_inference_steps"]))
    assert decisions[0]["decision"] == "compute"
    assert all(d["distance"] is not None for d in decisions if d["decision"] == "skip")
    assert stats["work_fraction"] == pytest.approx(stats["computed_steps"] / PARAMS["num_inference_steps"])
    assert max_abs_diff(output.images[0], reference) > 0


def test_teacache_always_computes_first_and_last_step(skipping_omni: Omni) -> None:
    if skipping_omni.engine.runner.cache.name != "tea_cache":
        pytest.skip("a TeaCache rule")
    decisions = skipping_omni.generate("a red cat", {**PARAMS, "seed": 4})[0].cache_stats["branches"]["cond"]["decisions"]
    assert decisions[0]["decision"] == decisions[-1]["decision"] == "compute"
    assert any(d["decision"] == "skip" for d in decisions)


def test_no_state_leaks_between_requests(skipping_omni: Omni) -> None:
    first = skipping_omni.generate("a red cat", {**PARAMS, "seed": 1})[0]
    skipping_omni.generate("a blue dog on the left", {**PARAMS, "seed": 9, "num_inference_steps": 5})
    again = skipping_omni.generate("a red cat", {**PARAMS, "seed": 1})[0]
    assert np.array_equal(media(first), media(again))
    assert first.cache_stats["branches"] == again.cache_stats["branches"]


def test_batched_equals_solo_with_the_cache_on(skipping_omni: Omni) -> None:
    prompts = ["a red cat", "a blue square on the left", "a green triangle"]
    params = [{**PARAMS, "seed": s} for s in (11, 12, 13)]
    solo = [skipping_omni.generate(p, sp)[0] for p, sp in zip(prompts, params, strict=True)]
    batched = skipping_omni.generate(prompts, params)
    assert max(o.timings["batch_size"] for o in batched) > 1
    for one, many in zip(solo, batched, strict=True):
        assert max_abs_diff(one.images[0], many.images[0]) <= 1
        assert ([d["decision"] for d in one.cache_stats["branches"]["cond"]["decisions"]]
                == [d["decision"] for d in many.cache_stats["branches"]["cond"]["decisions"]])


def test_a_request_joining_mid_run_keeps_its_own_decisions_and_output(skipping_omni: Omni) -> None:
    """In a continuous batch each request is at its own step: its cache decides from its own history, so it
    skips exactly the steps it skips alone and its image equals its solo image; its mate's too."""
    long_params = {**PARAMS, "num_inference_steps": 9, "seed": 21}
    short_params = {**PARAMS, "num_inference_steps": 5, "seed": 22}
    transformer = skipping_omni.engine.runner.model.pipeline.transformer
    with count_block_work(transformer) as solo_work:
        long_solo = skipping_omni.generate("a red cat", long_params)[0]
        short_solo = skipping_omni.generate("a blue dog on the left", short_params)[0]
    engine = skipping_omni.engine
    joined = {}

    def join_after_step_3(done: int, _total: int) -> None:
        if done == 3:
            request = engine.make_request("a blue dog on the left", OmniDiffusionSamplingParams(**short_params))
            joined["future"] = engine.submit(request)

    long_request = engine.make_request("a red cat", OmniDiffusionSamplingParams(**long_params),
                                       progress_callback=join_after_step_3)
    with count_block_work(transformer) as batched_work:
        long_out = engine.submit(long_request).result(timeout=120)
        short_out = joined["future"].result(timeout=120)
    # steps where one skips and the other computes run the blocks on the computing rows alone
    assert batched_work.rows == solo_work.rows
    assert short_out.cache_stats["shared_with"] == [long_out.request_id]
    for solo, batched in ((long_solo, long_out), (short_solo, short_out)):
        assert batched.timings["batch_size"] == 2
        assert max_abs_diff(solo.images[0], batched.images[0]) <= 1
        decisions = [[d["decision"] for d in o.cache_stats["branches"]["cond"]["decisions"]] for o in (solo, batched)]
        assert decisions[0] == decisions[1] and "skip" in decisions[0]


def test_a_long_run_that_skips_nothing_is_loud(tiny_flux_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    with Omni(tiny_flux_dir, cache_backend="tea_cache", cache_config={"rel_l1_thresh": 0.0}) as omni:
        with caplog.at_level(logging.WARNING, logger="ditserve.cache.base"):
            long_run = omni.generate("a red cat", {**PARAMS, "num_inference_steps": 20, "seed": 1})[0]
        short_run = omni.generate("a red cat", {**PARAMS, "num_inference_steps": 19, "seed": 1})[0]
    assert "skipped nothing in 20 steps" in long_run.cache_stats["warning"]
    assert any("skipped nothing" in r.message for r in caplog.records)
    assert "warning" not in short_run.cache_stats


FORECASTING = {"rel_l1_thresh": 5.0, "forecast_order": 1}
#: enough steps for skips after two computed steps at that threshold (forecasts need two residuals)
FORECAST_STEPS = 12


@pytest.fixture(scope="module")
def forecasting_omni(tiny_flux_dir: str):
    omni = Omni(tiny_flux_dir, cache_backend="tea_cache", cache_config=FORECASTING, max_batch_size=4)
    yield omni
    omni.close()


def test_forecast_order_0_is_todays_reuse_bit_for_bit(skipping_omni: Omni, tiny_flux_dir: str) -> None:
    if skipping_omni.engine.runner.cache.name != "tea_cache":
        pytest.skip("the knob is TeaCache's")
    params = {**PARAMS, "num_inference_steps": FORECAST_STEPS, "seed": 1}
    today = skipping_omni.generate("a red cat", params)[0]
    with Omni(tiny_flux_dir, cache_backend="tea_cache",
              cache_config={**SKIPPING["tea_cache"], "forecast_order": 0}) as omni:
        explicit = omni.generate("a red cat", params)[0]
    assert today.cache_stats["skipped_steps"] > 0
    assert np.array_equal(media(today), media(explicit))
    assert today.cache_stats["forecast_steps"] == explicit.cache_stats["forecast_steps"] == 0


def test_forecasting_changes_the_skipped_steps_and_says_so(forecasting_omni: Omni, skipping_omni: Omni) -> None:
    if skipping_omni.engine.runner.cache.name != "tea_cache":
        pytest.skip("compared with TeaCache reuse")
    params = {**PARAMS, "num_inference_steps": FORECAST_STEPS, "seed": 1}
    forecast = forecasting_omni.generate("a red cat", params)[0]
    reused = skipping_omni.generate("a red cat", params)[0]
    stats = forecast.cache_stats
    decisions = stats["branches"]["cond"]["decisions"]
    # the skips after two computed steps are forecast, the ones before reuse the first residual
    first_two = [i for i, d in enumerate(decisions) if d["decision"] == "compute"][1]
    assert [d["forecast"] for d in decisions] == [
        d["decision"] == "skip" and i > first_two for i, d in enumerate(decisions)]
    assert stats["forecast_steps"] == stats["branches"]["cond"]["forecast"] > 0
    assert max_abs_diff(forecast.images[0], reused.images[0]) > 0


def test_batched_equals_solo_with_forecasting_on(forecasting_omni: Omni) -> None:
    prompts = ["a red cat", "a blue square on the left", "a green triangle"]
    params = [{**PARAMS, "num_inference_steps": FORECAST_STEPS, "seed": s} for s in (11, 12, 13)]
    solo = [forecasting_omni.generate(p, sp)[0] for p, sp in zip(prompts, params, strict=True)]
    batched = forecasting_omni.generate(prompts, params)
    assert max(o.timings["batch_size"] for o in batched) > 1
    assert all(o.cache_stats["forecast_steps"] > 0 for o in solo)
    for one, many in zip(solo, batched, strict=True):
        assert max_abs_diff(one.images[0], many.images[0]) <= 1
        assert ([(d["decision"], d["forecast"]) for d in one.cache_stats["branches"]["cond"]["decisions"]]
                == [(d["decision"], d["forecast"]) for d in many.cache_stats["branches"]["cond"]["decisions"]])


#: branch ratios that drift apart: cond never, uncond by 20 % a step (with K and the retention out of the way)
DRIFTING_BRANCHES = {"magcache_thresh": 0.3, "magcache_K": 10, "retention_ratio": 0.0,
                     "mag_ratios": {"cond": [1.0] * 6, "uncond": [1.0] + [1.2] * 5}}
#: uncond's error after one skip is 0.2 (under 0.3), after two 0.2 + 0.44: every second step computes
IN_STEP_DECISIONS = ["compute", "skip", "compute", "skip", "compute", "skip"]


def test_magcache_guidance_branches_decide_together_on_the_larger_drift(tiny_flux_dir: str) -> None:
    """Separate cond and uncond passes skip the same steps, at the pace of the branch that drifts more (cond's
    ratios alone would skip every step after the first)."""
    guided = {**PARAMS, "seed": 1, "true_cfg_scale": 2.0, "negative_prompt": "a blurry dog"}
    with Omni(tiny_flux_dir, cache_backend="mag_cache", cache_config=DRIFTING_BRANCHES) as omni:
        branches = omni.generate("a red cat", guided)[0].cache_stats["branches"]
    assert set(branches) == {"cond", "uncond"}
    for record in branches.values():
        assert [d["decision"] for d in record["decisions"]] == IN_STEP_DECISIONS


def test_magcache_plans_the_decisions_it_makes(tiny_flux_dir: str) -> None:
    """What calibration's search keys MagCache configs by: the decisions planned from the config and the ratios
    alone are the ones a generation makes, on every branch, and configs that plan alike generate alike."""
    from ditserve.cache.selector import build_cache_backend

    guided = {**PARAMS, "seed": 1, "true_cfg_scale": 2.0, "negative_prompt": "a blurry dog"}
    looser = {**DRIFTING_BRANCHES, "magcache_thresh": 0.35}  # uncond's errors are 0.2 and 0.64: the same plan
    images = []
    for config in (DRIFTING_BRANCHES, looser):
        with Omni(tiny_flux_dir, cache_backend="mag_cache", cache_config=config) as omni:
            runner = omni.engine.runner
            plan = build_cache_backend("mag_cache", config).planned_decisions(runner.model.pipeline, runner.adapter, 6)
            output = omni.generate("a red cat", guided)[0]
        assert plan == {"transformer": [d == "skip" for d in IN_STEP_DECISIONS]}
        for record in output.cache_stats["branches"].values():
            assert [d["decision"] == "skip" for d in record["decisions"]] == plan["transformer"]
        images.append(media(output))
    assert np.array_equal(images[0], images[1])


def test_magcache_k_growth_spaces_computed_steps_ever_wider(tiny_flux_dir: str) -> None:
    """The cap on skips in a row is floor(K * growth**j) after the j-th step computed past the retention; growth 1
    is the constant K. A threshold out of reach leaves the cap alone to decide."""
    from ditserve.cache.magcache import MagCachePolicy
    from ditserve.errors import CacheConfigError

    def computed(growth: float, max_skips: int = 1, retention: float = 0.0, steps: int = 50) -> list[int]:
        policy = MagCachePolicy(100.0, max_skips, retention, {"*": [1.0] * steps}, growth)
        state = policy.new_state("cond")
        return [step for step in range(steps) if not policy.decide(state, step, steps, None).skip]

    assert computed(2.0) == [0, 2, 5, 10, 19, 36]  # skips in a row: 1, 2, 4, 8, 16
    assert computed(1.75) == [0, 2, 4, 8, 14, 24, 41]  # 1, 1, 3, 5, 9, 16
    assert computed(1.0, max_skips=3) == list(range(0, 50, 4))
    # the retention's steps run and the cap starts growing only after it
    assert computed(2.0, retention=0.1)[:8] == [0, 1, 2, 3, 4, 6, 9, 14]
    # a threshold that computes every step grows the cap a thousand times: it stays at the step count
    everything = MagCachePolicy(0.0, 1, 0.0, {"*": [1.0] * 1000}, 10.0)
    state = everything.new_state("cond")
    assert not any(everything.decide(state, step, 1000, None).skip for step in range(1000))
    assert everything.skip_cap(state.computed_after_retention, 1000) == 1000
    config = {"magcache_thresh": 100.0, "magcache_K": 1, "magcache_K_growth": 2.0, "retention_ratio": 0.0,
              "mag_ratios": [1.0] * 6}
    with Omni(tiny_flux_dir, cache_backend="mag_cache", cache_config=config) as omni:
        stats = omni.generate("a red cat", PARAMS)[0].cache_stats
    assert [d["decision"] for d in stats["branches"]["cond"]["decisions"]] == [
        "compute", "skip", "compute", "skip", "skip", "compute"]
    with pytest.raises(CacheConfigError, match="magcache_K_growth"):
        Omni(tiny_flux_dir, cache_backend="mag_cache", cache_config={**config, "magcache_K_growth": 0.5})


def test_a_step_computed_for_want_of_a_stored_residual_resets_the_policy_as_a_compute_does() -> None:
    """When the hooks overrule a skip (no stored residual, as at a Wan2.2 expert's first step) the policy's state
    restarts as if it had decided to compute: MagCache's next run of skips is not cut short, TeaCache's
    accumulated distance starts again."""
    from ditserve.cache.magcache import MagCachePolicy
    from ditserve.cache.teacache import TeaCachePolicy

    policy = MagCachePolicy(100.0, 2, 0.0, {"*": [1.0] * 10}, 1.0)
    decided, overruled = policy.new_state("cond"), policy.new_state("cond")
    policy.decide(decided, 0, 10, None), policy.decide(overruled, 0, 10, None)
    policy.decide(decided, 1, 10, None)
    policy.decide(decided, 2, 10, None)
    assert not policy.decide(decided, 3, 10, None).skip  # third in a row: over K 2, computes
    assert policy.decide(overruled, 3, 10, None).skip  # as if steps 1-2 had been computed: the first skip
    policy.computed_instead(overruled)  # ... which the hooks overrule
    assert [policy.decide(s, 4, 10, None).skip for s in (decided, overruled)] == [True, True]
    assert [policy.decide(s, 5, 10, None).skip for s in (decided, overruled)] == [True, True]
    assert [policy.decide(s, 6, 10, None).skip for s in (decided, overruled)] == [False, False]
    tea = TeaCachePolicy(0.5, [1.0, 0.0])
    state = tea.new_state("cond")
    tea.decide(state, 0, 10, torch.ones(1, 4))
    assert tea.decide(state, 1, 10, torch.full((1, 4), 1.3)).skip  # 0.3 accumulated
    tea.computed_instead(state)
    assert tea.decide(state, 2, 10, torch.full((1, 4), 1.3 * 1.3)).skip  # 0.3 again, not 0.6

