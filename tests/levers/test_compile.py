"""Regional compile: only the repeated blocks are compiled, output equals eager, and caches compose with it."""

from __future__ import annotations

import pytest
import torch

from ditserve import Omni
from ditserve.config import OmniDiffusionConfig
from ditserve.errors import InvalidParameterError, UnsupportedModelError
from ditserve.levers import wants_compile
from ditserve.levers.compile import compile_repeated_blocks, is_compiled, repeated_blocks
from ditserve.testing.compare import max_abs_diff
from tests.levers.conftest import BASE, PROMPT

#: thresholds far above any step-to-step change of the random model, so the caches really skip steps
FORCED_SKIP = {"tea_cache": {"rel_l1_thresh": 50.0},
               "mag_cache": {"magcache_thresh": 50.0, "magcache_K": 5, "retention_ratio": 0.0},
               "cache_dit": {"residual_diff_threshold": 50.0, "max_warmup_steps": 1}}
CACHE_PARAMS = {**BASE, "num_inference_steps": 6}


@pytest.fixture(scope="module")
def compiled_omni(tiny_flux_dir: str):
    omni = Omni(model=tiny_flux_dir, enforce_eager=False)
    yield omni
    omni.close()


def transformer_of(omni: Omni) -> torch.nn.Module:
    return omni.engine.runner.model.pipeline.transformer


def test_only_repeated_blocks_are_compiled(compiled_omni: Omni) -> None:
    transformer = transformer_of(compiled_omni)
    blocks = repeated_blocks(transformer)
    assert len(blocks) == len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert all(is_compiled(block) for block in blocks)
    assert not is_compiled(transformer)
    assert "regional_compile" in compiled_omni.engine.runner.model.levers


def test_compiled_transformer_equals_eager(compiled_omni: Omni, flux_omni: Omni) -> None:
    compiled, eager = transformer_of(compiled_omni), transformer_of(flux_omni)
    generator = torch.Generator("cpu").manual_seed(0)
    tokens, text = 256, BASE["max_sequence_length"]  # the engine test's shapes: one compile serves both
    inputs = {"hidden_states": torch.randn(1, tokens, 16, generator=generator),
              "encoder_hidden_states": torch.randn(1, text, 32, generator=generator),
              "pooled_projections": torch.randn(1, 32, generator=generator), "timestep": torch.tensor([0.7]),
              "img_ids": torch.randn(tokens, 3, generator=generator), "txt_ids": torch.zeros(text, 3),
              "return_dict": False}
    with torch.no_grad():
        expected, actual = eager(**inputs)[0], compiled(**inputs)[0]
    assert expected.abs().mean() > 0.1  # the comparison is about a real signal
    # fp32 rounding of reordered sums only: a few units in the sixth digit of the largest output
    assert torch.allclose(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def test_compiled_engine_output_equals_eager(compiled_omni: Omni, plain_flux_images: list) -> None:
    images = compiled_omni.generate(PROMPT, seed=5, **BASE)[0].images
    assert max_abs_diff(images[0], plain_flux_images[0]) <= 1


@pytest.mark.parametrize("backend", sorted(FORCED_SKIP))
def test_compile_composes_with_cache(tiny_flux_dir: str, backend: str) -> None:
    results = {}
    for eager in (True, False):
        with Omni(model=tiny_flux_dir, cache_backend=backend, cache_config=FORCED_SKIP[backend],
                  enforce_eager=eager) as omni:
            output = omni.generate(PROMPT, seed=2, **CACHE_PARAMS)[0]
            results[eager] = (output.images[0], output.cache_stats)
    (eager_image, eager_stats), (compiled_image, compiled_stats) = results[True], results[False]
    assert eager_stats["skipped_steps"] > 0
    assert compiled_stats["skipped_steps"] == eager_stats["skipped_steps"]
    assert compiled_stats["computed_steps"] == eager_stats["computed_steps"]
    assert max_abs_diff(compiled_image, eager_image) <= 1


def test_module_without_repeated_blocks_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="enforce_eager"):
        compile_repeated_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_block_lists_are_found_without_repeated_blocks_attribute() -> None:
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
    model.head = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.ReLU()])  # mixed classes: not repeated
    assert repeated_blocks(model) == list(model.layers)


def test_compile_with_layerwise_offload_is_refused(tiny_flux_dir: str) -> None:
    with pytest.raises(InvalidParameterError, match="enable_layerwise_offload"):
        Omni(model=tiny_flux_dir, enforce_eager=False, enable_layerwise_offload=True)


def test_auto_compiles_on_cuda_only_and_never_with_layerwise_offload() -> None:
    auto = OmniDiffusionConfig(enforce_eager=None)
    assert wants_compile(auto, torch.device("cuda"))
    assert not wants_compile(auto, torch.device("cpu"))
    assert not wants_compile(OmniDiffusionConfig(enforce_eager=None, enable_layerwise_offload=True),
                             torch.device("cuda"))
    assert wants_compile(OmniDiffusionConfig(enforce_eager=False), torch.device("cpu"))
    assert not wants_compile(OmniDiffusionConfig(enforce_eager=True), torch.device("cuda"))


def test_auto_stays_eager_on_cpu(tiny_flux_dir: str) -> None:
    with Omni(model=tiny_flux_dir, device="cpu", enforce_eager=None) as omni:
        transformer = transformer_of(omni)
        assert not any(is_compiled(block) for block in repeated_blocks(transformer))
        assert "regional_compile" not in omni.engine.runner.model.levers
