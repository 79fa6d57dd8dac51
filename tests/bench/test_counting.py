import pytest
import torch

from ditserve.bench.counting import BlockWorkCounter, transformer_blocks

STEPS = 3


@pytest.fixture(scope="module")
def pipeline(tiny_flux_dir: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe) -> None:
    pipe("a red circle", num_inference_steps=STEPS, height=32, width=32,
         generator=torch.Generator("cpu").manual_seed(0), output_type="np")


def _count_block_calls(transformer: torch.nn.Module) -> tuple[list[int], list]:
    calls = [0]

    def count(module: torch.nn.Module, args: object) -> None:
        calls[0] += 1

    return calls, [block.register_forward_pre_hook(count) for block in transformer_blocks(transformer)]


def test_uncached_run_counts_attention_and_mlp_of_every_block_at_every_step(pipeline) -> None:
    counter = BlockWorkCounter([pipeline.transformer])
    try:
        _generate(pipeline)
        blocks = len(list(transformer_blocks(pipeline.transformer)))
        assert counter.take() == 2 * blocks * STEPS
        assert counter.take() == 0
        assert counter.is_reliable()
    finally:
        counter.remove()


def test_skipped_blocks_are_not_counted_although_block_hooks_still_fire(pipeline) -> None:
    from diffusers.hooks import FirstBlockCacheConfig

    counter = BlockWorkCounter([pipeline.transformer])
    block_calls, handles = _count_block_calls(pipeline.transformer)
    try:
        _generate(pipeline)
        full_units, full_block_calls = counter.take(), block_calls[0]
        block_calls[0] = 0
        # a huge threshold makes First Block Cache reuse every step after the first
        pipeline.transformer.enable_cache(FirstBlockCacheConfig(threshold=1e9))
        try:
            _generate(pipeline)
        finally:
            pipeline.transformer.disable_cache()
        assert counter.take() < full_units
        assert block_calls[0] == full_block_calls  # why block-level hooks cannot count work
    finally:
        counter.remove()
        for handle in handles:
            handle.remove()


def test_a_model_without_blocks_is_refused() -> None:
    with pytest.raises(TypeError, match="no attention or MLP"):
        BlockWorkCounter([torch.nn.Sequential(torch.nn.Linear(2, 2))])
