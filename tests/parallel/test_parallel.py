"""Multi-device parallelism on 2 gloo ranks (this CPU): every method equals the single-process run.

Spawning a rank costs seconds of imports, so processes are few: one parity group runs every (family, method)
case on fresh rank runners (``parity_harness``); two engine groups check the full ``Omni`` path, a clean
shutdown, and that a killed rank fails the run quickly with a clear error.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from parity_harness import Case, CaseResult, run_parity_group, single_process_run
from PIL import Image

from ditserve import Omni
from ditserve.config import DiffusionParallelConfig, OmniDiffusionConfig, OmniDiffusionSamplingParams
from ditserve.engine.runner import ModelRunner
from ditserve.errors import EngineClosedError, ParallelConfigError, RequestAbortedError
from ditserve.parallel.attention import PartialAttention, attention_with_lse
from ditserve.parallel.families.base import FamilyPlan
from ditserve.parallel.families.flux import FluxPlan
from ditserve.parallel.install import check_model
from ditserve.parallel.rank import RankRunner
from ditserve.parallel.tensor import SplitCheck
from ditserve.parallel.topology import RankCoordinates, coordinates_of, rank_of
from ditserve.testing import tiny_pipeline_dir

METHODS = {"cfg": {"cfg_parallel_size": 2}, "ulysses": {"ulysses_degree": 2}, "ring": {"ring_degree": 2},
           "tp": {"tensor_parallel_size": 2}}
GUIDED = {"true_cfg_scale": 4.0, "negative_prompt": "blue"}
PARAMS = {
    "flux": {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 1, **GUIDED},
    "qwen_image": {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 1, **GUIDED},
    "wan": {"num_inference_steps": 2, "height": 32, "width": 32, "num_frames": 5, "seed": 1,
            "max_sequence_length": 32, "guidance_scale": 5.0, "negative_prompt": "blue"},
}
PROMPT = "a red circle at top left"


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ---------------------------------------------------------------------------------------------- no processes
def test_rank_layout_round_trips_and_keeps_ulysses_innermost() -> None:
    config = DiffusionParallelConfig(cfg_parallel_size=2, ulysses_degree=2, ring_degree=2)
    coordinates = [coordinates_of(rank, config) for rank in range(config.world_size)]
    assert [rank_of(c, config) for c in coordinates] == list(range(8))
    assert coordinates[1] == RankCoordinates(cfg_rank=0, ring_rank=0, ulysses_rank=1)
    assert coordinates[2] == RankCoordinates(cfg_rank=0, ring_rank=1, ulysses_rank=0)
    assert coordinates[4].cfg_rank == 1


def test_rank_layout_keeps_the_tensor_parallel_pair_innermost() -> None:
    config = DiffusionParallelConfig(cfg_parallel_size=2, tensor_parallel_size=2)
    coordinates = [coordinates_of(rank, config) for rank in range(config.world_size)]
    assert [rank_of(c, config) for c in coordinates] == list(range(4))
    assert [(c.cfg_rank, c.tp_rank) for c in coordinates] == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.parametrize("masked", [False, True])
def test_attention_merged_over_key_blocks_equals_full_attention(masked: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 12, 3, 8, generator=generator) for _ in range(3))
    mask = torch.ones(2, 12, dtype=torch.bool)
    if masked:
        mask[0, :3] = False
    expected = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (query, key, value)), attn_mask=mask[:, None, None, :]).transpose(1, 2)
    partial = PartialAttention()
    for block in (slice(0, 5), slice(5, 9), slice(9, 12)):
        partial.add(*attention_with_lse(query, key[:, block], value[:, block], mask[:, block]))
    assert torch.allclose(partial.result(torch.float32), expected, atol=1e-6)
    # a missing block must show: the merge is not a no-op
    partial_without_last = PartialAttention()
    for block in (slice(0, 5), slice(5, 9)):
        partial_without_last.add(*attention_with_lse(query, key[:, block], value[:, block], mask[:, block]))
    assert not torch.allclose(partial_without_last.result(torch.float32), expected, atol=1e-3)


def test_start_up_checks_heads_and_family() -> None:
    flux = ModelRunner(OmniDiffusionConfig(model=tiny_pipeline_dir("flux"), device="cpu"))
    with pytest.raises(ParallelConfigError, match=r"ulysses_degree=8 must divide the 4 attention heads"):
        check_model(flux.adapter, DiffusionParallelConfig(ulysses_degree=8))
    assert check_model(flux.adapter, DiffusionParallelConfig(ulysses_degree=4)) is not None
    z_image = ModelRunner(OmniDiffusionConfig(model=tiny_pipeline_dir("z_image"), device="cpu"))
    with pytest.raises(ParallelConfigError, match="not available for ZImagePipeline"):
        check_model(z_image.adapter, DiffusionParallelConfig(cfg_parallel_size=2))
    # SD3 has a CFG-parallel plan and nothing more: the other methods are refused at start-up, by name
    sd3 = ModelRunner(OmniDiffusionConfig(model=tiny_pipeline_dir("sd3"), device="cpu"))
    assert check_model(sd3.adapter, DiffusionParallelConfig(cfg_parallel_size=2)) is not None
    for method in ("ulysses", "ring"):
        with pytest.raises(ParallelConfigError, match=r"sequence parallelism \(Ulysses, ring\) has no plan for "
                                                      "SD3Transformer2DModel"):
            check_model(sd3.adapter, DiffusionParallelConfig(**METHODS[method]))
    with pytest.raises(ParallelConfigError, match="tensor parallelism has no plan for SD3Transformer2DModel"):
        check_model(sd3.adapter, DiffusionParallelConfig(**METHODS["tp"]))


@pytest.fixture(scope="module")
def flux_runner() -> ModelRunner:
    return ModelRunner(OmniDiffusionConfig(model=tiny_pipeline_dir("flux"), device="cpu"))


def test_tensor_parallel_start_up_checks_name_the_allowed_sizes(flux_runner: ModelRunner) -> None:
    transformer = flux_runner.adapter.pipeline.transformer
    heads = transformer.config.num_attention_heads
    for size in (3, 2 * heads):  # 3 divides neither heads nor widths; 2 x heads divides widths, not heads
        with pytest.raises(ParallelConfigError, match=rf"tensor_parallel_size={size} must divide the attention "
                                                      rf"heads \[{heads}\].*allowed: \[1, 2, 4\]"):
            check_model(flux_runner.adapter, DiffusionParallelConfig(tensor_parallel_size=size))
    assert check_model(flux_runner.adapter, DiffusionParallelConfig(tensor_parallel_size=heads)) is not None
    # Ulysses splits the heads left to each tensor-parallel rank
    with pytest.raises(ParallelConfigError, match=r"ulysses_degree=4 must divide the 2 attention heads \(4 / "):
        check_model(flux_runner.adapter, DiffusionParallelConfig(tensor_parallel_size=2, ulysses_degree=4))


@pytest.mark.parametrize(("parallel", "offload", "sharded_in_cpu_memory"), [
    ({"tensor_parallel_size": 2}, False, True),
    ({"tensor_parallel_size": 2}, True, False),
    ({"ulysses_degree": 2}, False, False),
])
def test_tensor_parallel_loads_into_cpu_memory_and_places_only_the_shard(parallel: dict[str, int], offload: bool,
                                                                          sharded_in_cpu_memory: bool) -> None:
    # a whole TP model is what does not fit one device: it must not be moved there before it is sharded
    runner = RankRunner.__new__(RankRunner)
    runner.config = OmniDiffusionConfig(model="x", device="cuda:1", enable_cpu_offload=offload,
                                        parallel_config=DiffusionParallelConfig(**parallel))
    assert runner._shards_before_placing() is sharded_in_cpu_memory
    assert runner._load_options()["keep_on_cpu"] is (sharded_in_cpu_memory or offload)


def test_tensor_parallel_refuses_gated_feed_forwards_quantized_linears_and_families_without_a_plan(
        flux_runner: ModelRunner) -> None:
    from diffusers.models.attention import FeedForward

    transformer = flux_runner.adapter.pipeline.transformer
    with pytest.raises(ParallelConfigError, match="GEGLU"):
        SplitCheck().feed_forward(FeedForward(dim=8, activation_fn="geglu"), "ff")

    class QuantizedLinear(torch.nn.Linear):
        pass

    block = transformer.single_transformer_blocks[0]
    plain = block.proj_mlp
    block.proj_mlp = QuantizedLinear(plain.in_features, plain.out_features)
    try:
        with pytest.raises(ParallelConfigError, match="proj_mlp is QuantizedLinear"):
            FluxPlan().split_tensor_parallel(transformer, SplitCheck())
    finally:
        block.proj_mlp = plain

    class PlanWithoutTensorParallel(FluxPlan):
        split_tensor_parallel = FamilyPlan.split_tensor_parallel

    with pytest.raises(ParallelConfigError, match="tensor parallelism has no plan for FluxTransformer2DModel"):
        PlanWithoutTensorParallel().split_tensor_parallel(transformer, SplitCheck())


# ---------------------------------------------------------------------------------------------- parity group
CASES = [Case(f"{family}-{method}", tiny_pipeline_dir(family), degrees, PROMPT, PARAMS[family])
         for family in PARAMS for method, degrees in METHODS.items()]
# Wan2.2 I2V-A14B: the first-frame condition concatenated on channels, both experts, every method
I2V_IMAGE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
I2V_CASES = [Case(f"wan_i2v_a14b-{method}", tiny_pipeline_dir("wan_i2v_a14b"), degrees, PROMPT,
                  {**PARAMS["wan"], "num_inference_steps": 4}, images=(I2V_IMAGE,))
             for method, degrees in METHODS.items()]
# FLUX.1-Kontext: the input image's tokens follow the noisy ones in the sharded sequence, every method
KONTEXT_IMAGE = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8))
KONTEXT_CASES = [Case(f"flux_kontext-{method}", tiny_pipeline_dir("flux_kontext"), degrees, PROMPT,
                      {"num_inference_steps": 2, "seed": 1, "max_sequence_length": 64, "guidance_scale": 2.5,
                       **GUIDED}, images=(KONTEXT_IMAGE,))
                 for method, degrees in METHODS.items()]
# Qwen-Image-Layered: a square RGBA input (an even token count per image, so the sequence splits), true CFG, the
# layers and the condition image in one sequence; the methods Qwen-Image has but tensor parallelism
LAYERED_IMAGE = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA")
LAYERED_CASES = [Case(f"qwen_image_layered-{method}", tiny_pipeline_dir("qwen_image_layered"), METHODS[method], PROMPT,
                      {"num_inference_steps": 2, "layers": 1, "seed": 1, **GUIDED}, images=(LAYERED_IMAGE,))
                 for method in ("cfg", "ulysses", "ring")]
# CFG-parallel on a request without guidance: the uncond rank must receive the cond output
UNGUIDED_FLUX = Case("flux-cfg-unguided", tiny_pipeline_dir("flux"), METHODS["cfg"], PROMPT,
                     {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 1})
# SD3: classic CFG (guidance_scale > 1) with a negative prompt, its branches on two ranks
SD3_CFG = Case("sd3-cfg", tiny_pipeline_dir("sd3"), METHODS["cfg"], PROMPT,
               {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 1, "max_sequence_length": 32,
                "negative_prompt": "blue"})
# Ovis-Image: classic CFG (its default guidance_scale 5.0) against a negative prompt, its branches on two ranks
OVIS_CFG = Case("ovis_image-cfg", tiny_pipeline_dir("ovis_image"), METHODS["cfg"], PROMPT,
                {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 1, "max_sequence_length": 128,
                 "negative_prompt": "blue"})
GUIDED_CFG = {"sd3": SD3_CFG, "ovis_image": OVIS_CFG}
# TeaCache with a threshold so high that every middle step skips: both ranks must follow the same decisions
CACHED = {(family, method): Case(f"{family}-{method}-tea_cache", tiny_pipeline_dir(family), METHODS[method], PROMPT,
                                 {**PARAMS[family], "num_inference_steps": 4},
                                 cache=("tea_cache", {"rel_l1_thresh": 100.0}))
          for family, method in (("flux", "ulysses"), ("wan", "ulysses"), ("flux", "tp"), ("wan", "tp"))}


@pytest.fixture(scope="module")
def parity_results() -> tuple[dict[str, CaseResult], int | None]:
    return run_parity_group([*CASES, *I2V_CASES, *KONTEXT_CASES, *LAYERED_CASES, UNGUIDED_FLUX,
                             *GUIDED_CFG.values(), *CACHED.values()])


@pytest.fixture(scope="module")
def references() -> dict[str, CaseResult]:
    refs = {family: single_process_run(Case(family, tiny_pipeline_dir(family), {}, PROMPT, PARAMS[family]))
            for family in PARAMS}
    refs["wan_i2v_a14b"] = single_process_run(Case("wan_i2v_a14b", I2V_CASES[0].model_dir, {}, PROMPT,
                                                   I2V_CASES[0].params, images=I2V_CASES[0].images))
    refs["flux_kontext"] = single_process_run(Case("flux_kontext", KONTEXT_CASES[0].model_dir, {}, PROMPT,
                                                   KONTEXT_CASES[0].params, images=KONTEXT_CASES[0].images))
    refs["qwen_image_layered"] = single_process_run(Case("qwen_image_layered", LAYERED_CASES[0].model_dir, {}, PROMPT,
                                                         LAYERED_CASES[0].params, images=LAYERED_CASES[0].images))
    refs["flux-unguided"] = single_process_run(UNGUIDED_FLUX)
    for family, case in GUIDED_CFG.items():
        refs[family] = single_process_run(Case(family, case.model_dir, {}, PROMPT, case.params))
        refs[f"{family}-unguided"] = single_process_run(Case(family, case.model_dir, {}, PROMPT, {
            **case.params, "negative_prompt": None, "guidance_scale": 1.0}))
    # the single-process cached run depends on the family only
    refs |= {f"{family}-tea_cache": single_process_run(case) for (family, method), case in CACHED.items()
             if method == "ulysses"}
    return refs


@pytest.mark.parametrize("case", [*CASES, *I2V_CASES, *KONTEXT_CASES, *LAYERED_CASES], ids=lambda c: c.name)
def test_two_ranks_equal_one_process(case: Case, parity_results, references) -> None:
    results, _ = parity_results
    expected = references[case.name.split("-")[0]].latents
    assert results[case.name].latents.shape == expected.shape
    # fp32: ring attention sums in another order (and in float32 math), so allow rounding, relative to scale
    assert _relative_error(results[case.name].latents, expected) < 1e-4


@pytest.mark.parametrize("family", sorted(PARAMS))
def test_tensor_parallel_ranks_keep_only_their_shard_of_the_block_weights(family: str, parity_results,
                                                                          references) -> None:
    results, _ = parity_results
    sharded, whole = results[f"{family}-tp"].transformer_parameters, references[family].transformer_parameters
    # the split linears hold most of a block's weights; embedders, modulation and proj_out stay whole
    assert sharded < 0.75 * whole
    assert results[f"{family}-ulysses"].transformer_parameters == whole


def test_cfg_parallel_without_guidance_still_equals_one_process(parity_results, references) -> None:
    results, _ = parity_results
    assert _relative_error(results[UNGUIDED_FLUX.name].latents, references["flux-unguided"].latents) < 1e-4
    # the guided and unguided runs differ, so the check above can fail
    assert _relative_error(references["flux"].latents, references["flux-unguided"].latents) > 1e-2


@pytest.mark.parametrize("family", sorted(GUIDED_CFG))
def test_classic_cfg_parallel_equals_one_process(family: str, parity_results, references) -> None:
    results, _ = parity_results
    assert _relative_error(results[GUIDED_CFG[family].name].latents, references[family].latents) < 1e-4
    # guidance changes the result, so the branch each rank computed mattered
    assert _relative_error(references[family].latents, references[f"{family}-unguided"].latents) > 1e-2


@pytest.mark.parametrize(("family", "method"), sorted(CACHED))
def test_cache_decisions_agree_across_ranks(family: str, method: str, parity_results, references) -> None:
    results, _ = parity_results
    case = CACHED[family, method]
    parallel, single = results[case.name], references[f"{family}-tea_cache"]
    assert parallel.cache_stats["skipped_steps"] == single.cache_stats["skipped_steps"] > 0
    assert _relative_error(parallel.latents, single.latents) < 1e-4
    # skipping changed the result, so the equality above is not trivial
    assert _relative_error(single.latents, references[family].latents) > 1e-3


def test_parity_worker_exits_cleanly(parity_results) -> None:
    _, exit_code = parity_results
    assert exit_code == 0


# ---------------------------------------------------------------------------------------------- engine groups
ENGINE_PARAMS = {"num_inference_steps": 3, "height": 64, "width": 128, "seed": 5}


@pytest.fixture(scope="module")
def single_flux_images() -> list[np.ndarray]:
    with Omni(model=tiny_pipeline_dir("flux")) as omni:
        outputs = omni.generate([PROMPT, {"prompt": "a blue square", "negative_prompt": "red"}], ENGINE_PARAMS,
                                true_cfg_scale=3.0)
    return [np.asarray(o.images[0], dtype=np.int16) for o in outputs]


def test_omni_with_ulysses_equals_single_process_and_shuts_down_cleanly(single_flux_images) -> None:
    omni = Omni(model=tiny_pipeline_dir("flux"), parallel_config={"ulysses_degree": 2, "timeout_s": 30})
    workers = list(omni.engine.runner._workers)
    try:
        outputs = omni.generate([PROMPT, {"prompt": "a blue square", "negative_prompt": "red"}], ENGINE_PARAMS,
                                true_cfg_scale=3.0)
        images = [np.asarray(o.images[0], dtype=np.int16) for o in outputs]
        for image, expected in zip(images, single_flux_images, strict=True):
            assert np.abs(image - expected).max() <= 1
        assert np.abs(images[0] - images[1]).max() > 20  # different prompts: the comparison can fail
        # an abort seen by rank 0 stops every rank at the same step: the group stays usable
        aborted = omni.engine.make_request(PROMPT, OmniDiffusionSamplingParams(**ENGINE_PARAMS),
                                           progress_callback=lambda step, _: omni.engine.abort(request_id))
        request_id = aborted.request_id
        with pytest.raises(RequestAbortedError):
            omni.engine.generate([aborted])
        after_abort = omni.generate(PROMPT, ENGINE_PARAMS, true_cfg_scale=3.0)[0]
        assert np.abs(np.asarray(after_abort.images[0], dtype=np.int16) - single_flux_images[0]).max() <= 1
        # 36 x 36 gives 9 x 9 = 81 image tokens (VAE factor 2, 2x2 packing): not divisible by 2 ranks, refused
        # when the request is made
        with pytest.raises(ParallelConfigError, match="81 image tokens, not divisible"):
            omni.generate(PROMPT, {**ENGINE_PARAMS, "height": 36, "width": 36})
    finally:
        omni.close()
    assert [w.exitcode for w in workers] == [0]


def test_cfg_parallel_steps_a_batch_of_guided_and_unguided_requests(single_flux_images) -> None:
    """In one step batch only the guided request runs the unconditional branch: the two ranks' branches cover
    different rows, and each is sent whole to the other rank."""
    with Omni(model=tiny_pipeline_dir("flux"), parallel_config={"cfg_parallel_size": 2, "timeout_s": 30}) as omni:
        outputs = omni.generate([PROMPT, {"prompt": "a blue square", "negative_prompt": "red"}], ENGINE_PARAMS,
                                true_cfg_scale=3.0)
    assert [o.timings["batch_size"] for o in outputs] == [2, 2]
    for output, expected in zip(outputs, single_flux_images, strict=True):
        assert np.abs(np.asarray(output.images[0], dtype=np.int16) - expected).max() <= 1


def test_a_killed_rank_fails_the_run_quickly_with_a_clear_error() -> None:
    omni = Omni(model=tiny_pipeline_dir("flux"), parallel_config={"ring_degree": 2, "timeout_s": 30})
    worker = omni.engine.runner._workers[0]

    def kill_rank_one(step: int, _total: int) -> None:
        if step == 1:
            os.kill(worker.pid, signal.SIGKILL)

    try:
        params = OmniDiffusionSamplingParams(**{**ENGINE_PARAMS, "num_inference_steps": 20})
        request = omni.engine.make_request(PROMPT, params, progress_callback=kill_rank_one)
        start = time.monotonic()
        with pytest.raises(EngineClosedError, match=r"rank 1 \(pid \d+\) died: killed by signal SIGKILL"):
            omni.engine.generate([request])
        assert time.monotonic() - start < 10  # far below timeout_s: a dead peer is noticed at once
        with pytest.raises(EngineClosedError, match="stopped after a failure"):
            omni.generate(PROMPT, ENGINE_PARAMS)
    finally:
        omni.close()
