"""TeaCache on every supported family: exact when it may not skip, and its counted work matches its stats; MagCache
and Cache-DiT on the families with nothing else testing them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ditserve import Omni
from ditserve.cache.spec import cache_spec_for
from ditserve.config import OmniDiffusionSamplingParams
from ditserve.errors import CacheConfigError
from ditserve.request import RequestOutput
from ditserve.testing import tiny_pipeline_dir
from ditserve.testing.generic import generic_engine, generic_runner
from tests.cache.helpers import WorkCounter, count_block_work, media

FAMILY_PARAMS = {
    "qwen_image": {"height": 64, "width": 64},
    "sd3": {"height": 64, "width": 64, "max_sequence_length": 32},
    "z_image": {"height": 64, "width": 64},
    "wan": {"height": 32, "width": 32, "num_frames": 5},
    # Ovis spells its system prompt letter by letter with the tiny tokenizer: the prompt needs room after it
    "ovis_image": {"height": 64, "width": 64, "max_sequence_length": 128},
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


#: configs under which each backend skips every step it may (MagCache with flat ratios: no drift at all)
SKIPPING = {
    "mag_cache": {"mag_ratios": [1.0, 1.0], "magcache_thresh": 1.0, "retention_ratio": 0.0},
    "cache_dit": {"residual_diff_threshold": 10.0, "max_warmup_steps": 1, "max_continuous_cached_steps": -1},
}


def _layered_input(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 4), dtype=np.uint8), "RGBA")


#: what a request of each family needs besides its prompt: Qwen-Image-Layered decomposes an input image, and
#: guides only when asked (true CFG); its layers are few, its resolution the smallest
SKIP_FAMILIES = {
    "sd3": ({}, ()),
    "ovis_image": ({}, ()),
    "qwen_image_layered": ({"layers": 1, "true_cfg_scale": 4.0}, (_layered_input(0), _layered_input(1))),
}
SKIP_CASES = [(family, backend) for family in ("sd3", "ovis_image") for backend in sorted(SKIPPING)] + [
    ("qwen_image_layered", backend) for backend in ("cache_dit", "mag_cache", "tea_cache")]


@pytest.mark.parametrize(("family", "backend"), SKIP_CASES)
def test_skips_for_real_and_batched_equals_solo(family: str, backend: str) -> None:
    model = tiny_pipeline_dir(family)
    options, images = SKIP_FAMILIES[family]
    params = {**FAMILY_PARAMS.get(family, {}), **options, "num_inference_steps": 5, "seed": 2}
    prompts = [{"prompt": text, "multi_modal_data": {"image": image}} for text, image in
               zip(("a red cat", "a blue dog"), images, strict=True)] if images else ["a red cat", "a blue dog"]
    # both with a negative prompt: cache-dit batches only requests of equal params but prompt and seed
    pair = [(prompts[0], {**params, "negative_prompt": "blue"}), (prompts[1], {**params, "seed": 3,
                                                                             "negative_prompt": "red"})]
    config = {"tea_cache": {"rel_l1_thresh": 10.0}, **SKIPPING}[backend]
    with Omni(model) as omni:
        reference = omni.generate(*pair[0])[0]
    with Omni(model, cache_backend=backend, cache_config=config) as omni:
        transformer = omni.engine.runner.model.pipeline.transformer
        # the last block: cache-dit (Fn=1, Bn=0) always runs the first one, so count the one it may skip
        last_block = cache_spec_for(transformer, backend).blocks(transformer)[-1][0]
        counter = WorkCounter()
        handles = [m.register_forward_pre_hook(counter) for m in last_block.modules()
                   if isinstance(m, torch.nn.Linear)]
        try:
            solo = [omni.generate(prompt, p)[0] for prompt, p in pair]
            solo_calls, counter.calls = counter.calls, 0
            together = omni.generate([prompt for prompt, _ in pair], [p for _, p in pair])
        finally:
            for handle in handles:
                handle.remove()
    linears = sum(isinstance(m, torch.nn.Linear) for m in last_block.modules())
    stats = solo[0].cache_stats
    assert set(stats["branches"]) == {"cond", "uncond"}  # all guide here: two calls a step
    assert stats["skipped_steps"] > 0
    assert solo_calls == linears * sum(o.cache_stats["computed_steps"] for o in solo)
    assert counter.calls == linears * together[0].cache_stats["computed_steps"]  # one batch: its rows run together
    assert [o.timings["batch_size"] for o in together] == [2, 2]
    for alone, batched in zip(solo, together, strict=True):
        assert np.abs(media(alone).astype(int) - media(batched).astype(int)).max() <= 1
    # skipping changed the output: the equalities above are not those of an idle cache
    assert np.abs(media(solo[0]).astype(int) - media(reference).astype(int)).max() > 3


def _generic_ovis_run(params: dict, **config) -> tuple[RequestOutput, WorkCounter]:
    """Ovis-Image through the generic path (its own __call__): the output of ``params`` and the block work it
    ran."""
    from diffusers import OvisImagePipeline

    engine = generic_engine(OvisImagePipeline.from_pretrained(tiny_pipeline_dir("ovis_image")), **config)
    try:
        transformer = engine.runner.model.pipeline.transformer
        with count_block_work(transformer, config.get("cache_backend", "tea_cache")) as counter:
            output = engine.generate([engine.make_request("a red cat", OmniDiffusionSamplingParams(**params))])[0]
    finally:
        engine.close()
    return output, counter


@pytest.mark.parametrize("backend", ["tea_cache", "mag_cache"])
def test_caches_skip_for_real_on_the_generic_path(backend: str) -> None:
    """Ovis-Image run through its own __call__ makes its two guidance passes as two calls a step out of our sight:
    each keeps its own state (labels "cond" and "cond/call1"), and the counted block work follows the
    statistics."""
    params = {**FAMILY_PARAMS["ovis_image"], "num_inference_steps": 5, "seed": 2}
    config = {"tea_cache": {"rel_l1_thresh": 10.0}, **SKIPPING}[backend]
    _, one_step = _generic_ovis_run({**params, "num_inference_steps": 1})
    reference, _ = _generic_ovis_run(params)
    skipping, counter = _generic_ovis_run(params, cache_backend=backend, cache_config=config)
    stats = skipping.cache_stats
    assert set(stats["branches"]) == {"cond", "cond/call1"}
    assert stats["skipped_steps"] > 0
    assert counter.calls == stats["computed_steps"] * one_step.calls // len(stats["branches"])
    assert np.abs(media(skipping).astype(int) - media(reference).astype(int)).max() > 3


def test_cache_dit_is_refused_on_the_generic_path() -> None:
    from diffusers import OvisImagePipeline

    pipeline = OvisImagePipeline.from_pretrained(tiny_pipeline_dir("ovis_image"))
    with pytest.raises(CacheConfigError, match="OvisImagePipeline on the generic path"):
        generic_runner(pipeline, cache_backend="cache_dit")


@pytest.mark.parametrize("backend", ["tea_cache", "mag_cache"])
def test_residual_caches_skip_for_real_on_wan_image_to_video(backend: str) -> None:
    """Wan2.2 I2V-A14B: both experts read the latents concatenated with the first-frame condition (36 channels in);
    the cache spec reads block-level hidden states, so TeaCache and MagCache apply unchanged: exact when they may
    not skip, and when they skip, the work counted on both experts follows their statistics."""
    from PIL import Image

    model = tiny_pipeline_dir("wan_i2v_a14b")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    request = {"prompt": "a red cat", "multi_modal_data": {"image": image}}
    params = {**FAMILY_PARAMS["wan"], "num_inference_steps": 5, "seed": 2}
    with Omni(model) as omni:
        pipeline = omni.engine.runner.model.pipeline
        assert pipeline.transformer.config.in_channels > pipeline.transformer.config.out_channels
        # one step at t=999: the high-noise expert only, both guidance branches
        with count_block_work(pipeline.transformer) as one_step:
            omni.generate(request, {**params, "num_inference_steps": 1})
        reference = omni.generate(request, params)[0]
    never_skipping = {"tea_cache": {"rel_l1_thresh": 0.0}, "mag_cache": {**SKIPPING["mag_cache"], "magcache_thresh": 0.0}}
    with Omni(model, cache_backend=backend, cache_config=never_skipping[backend]) as omni:
        exact = omni.generate(request, params)[0]
    with Omni(model, cache_backend=backend, cache_config={"tea_cache": {"rel_l1_thresh": 10.0}, **SKIPPING}[backend]) \
            as omni:
        pipeline = omni.engine.runner.model.pipeline
        with (count_block_work(pipeline.transformer, backend) as high,
              count_block_work(pipeline.transformer_2, backend) as low):
            skipping = omni.generate(request, params)[0]
    assert np.array_equal(media(exact), media(reference))
    stats = skipping.cache_stats
    assert set(stats["branches"]) == {"cond", "uncond", "transformer_2:cond", "transformer_2:uncond"}
    assert stats["skipped_steps"] > 0
    assert high.calls > 0 and low.calls > 0
    assert high.calls + low.calls == stats["computed_steps"] * one_step.calls // 2
    assert np.abs(media(skipping).astype(int) - media(reference).astype(int)).max() > 3


def test_mag_cache_experts_decide_on_their_own_ratios() -> None:
    """Wan2.2 A14B: MagCache gives each expert the ratios calibration measured on it ("transformer_2:cond" for the
    low-noise one), indexed by the request's step: ratios that let the high-noise expert skip and stop the
    low-noise one skip on the first only."""
    model = tiny_pipeline_dir("wan_i2v_a14b")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    request = {"prompt": "a red cat", "multi_modal_data": {"image": image}}
    params = {**FAMILY_PARAMS["wan"], "num_inference_steps": 5, "seed": 2}
    still, drifting = [1.0] * 5, [1.0, 3.0, 3.0, 3.0, 3.0]
    ratios = {"cond": still, "uncond": still, "transformer_2:cond": drifting, "transformer_2:uncond": drifting}
    config = {"mag_ratios": ratios, "magcache_thresh": 1.0, "magcache_K": 10, "retention_ratio": 0.0}
    with Omni(model, cache_backend="mag_cache", cache_config=config) as omni:
        stats = omni.generate(request, params)[0].cache_stats
    branches = stats["branches"]
    assert branches["cond"]["skipped"] > 0 and branches["uncond"]["skipped"] > 0
    assert branches["transformer_2:cond"]["computed"] > 0
    assert branches["transformer_2:cond"]["skipped"] == branches["transformer_2:uncond"]["skipped"] == 0



def test_an_experts_first_step_computes_and_its_skips_in_a_row_start_afresh() -> None:
    """The low-noise expert has no stored residual at its first step: MagCache lets it skip, the hooks compute it,
    and the policy counts that as a computed step, so a full run of K skips follows (not one fewer)."""
    model = tiny_pipeline_dir("wan_i2v_a14b")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    request = {"prompt": "a red cat", "multi_modal_data": {"image": image}}
    params = {**FAMILY_PARAMS["wan"], "num_inference_steps": 12, "seed": 2}
    config = {"mag_ratios": [1.0] * 12, "magcache_thresh": 100.0, "magcache_K": 2, "retention_ratio": 0.0}
    with Omni(model, cache_backend="mag_cache", cache_config=config) as omni:
        branches = omni.generate(request, params)[0].cache_stats["branches"]
    for branch in ("transformer_2:cond", "transformer_2:uncond"):
        decisions = branches[branch]["decisions"]
        assert decisions[0]["reason"] == "no stored residual"
        assert [d["decision"] for d in decisions[1:4]] == ["skip", "skip", "compute"]

def test_cache_dit_skips_for_real_on_wan_image_to_video() -> None:
    """Wan2.2 I2V-A14B under Cache-DiT: each expert's library context runs only its share of the steps, so its
    statistics are published after each call (not at a last step that expert never reaches); the skips counted on
    both experts' last blocks follow them, step numbers are the request's, and a second request starts afresh."""
    model = tiny_pipeline_dir("wan_i2v_a14b")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    request = {"prompt": "a red cat", "multi_modal_data": {"image": image}}
    params = {**FAMILY_PARAMS["wan"], "num_inference_steps": 5, "seed": 2}
    with Omni(model) as omni:
        reference = omni.generate(request, params)[0]
    with Omni(model, cache_backend="cache_dit", cache_config=SKIPPING["cache_dit"]) as omni:
        pipeline = omni.engine.runner.model.pipeline
        counter = WorkCounter()
        last_blocks = [cache_spec_for(t, "cache_dit").blocks(t)[-1][0] for t in (pipeline.transformer,
                                                                                  pipeline.transformer_2)]
        linears = [m for block in last_blocks for m in block.modules() if isinstance(m, torch.nn.Linear)]
        handles = [m.register_forward_pre_hook(counter) for m in linears]
        try:
            first = omni.generate(request, params)[0]
            first_calls, counter.calls = counter.calls, 0
            second = omni.generate(request, params)[0]
        finally:
            for handle in handles:
                handle.remove()
    stats = first.cache_stats
    assert set(stats["branches"]) == {"cond", "uncond", "transformer_2:cond", "transformer_2:uncond"}
    high = [d["step"] for d in stats["branches"]["cond"]["decisions"]]
    low = [d["step"] for d in stats["branches"]["transformer_2:cond"]["decisions"]]
    assert high and low and high + low == list(range(5))  # the high-noise expert first, then the low-noise one
    assert stats["branches"]["cond"]["skipped"] > 0 and stats["branches"]["transformer_2:cond"]["skipped"] > 0
    assert stats["computed_steps"] + stats["skipped_steps"] == 10  # 5 steps, 2 guidance branches
    per_block = len(linears) // 2  # the two experts' blocks are alike
    assert first_calls == per_block * stats["computed_steps"]
    assert second.cache_stats["branches"] == stats["branches"] and counter.calls == first_calls
    assert np.array_equal(media(second), media(first))
    assert np.abs(media(first).astype(int) - media(reference).astype(int)).max() > 3


def test_cache_dit_steps_mask_is_refused_on_two_experts() -> None:
    with pytest.raises(CacheConfigError, match="split the steps between them"):
        Omni(tiny_pipeline_dir("wan_i2v_a14b"), cache_backend="cache_dit",
             cache_config={"scm_steps_mask_policy": "fast"})
