"""CPU offload: refused on a CPU device; the hook logic runs on CPU (diffusers allows a CPU "onload" device) and
leaves outputs unchanged; on a GPU the weights really stay in CPU memory and the device peak drops."""

from __future__ import annotations

import pytest
import torch

from ditserve import Omni
from ditserve.config import OmniDiffusionConfig, OmniDiffusionSamplingParams
from ditserve.engine.runner import ModelRunner
from ditserve.errors import InvalidParameterError
from ditserve.levers.compile import repeated_blocks
from ditserve.levers.offload import enable_layerwise_offload, enable_model_offload
from ditserve.models.loader import LoadedModel, load_model
from ditserve.request import Request
from ditserve.testing.compare import max_abs_diff
from tests.levers.conftest import BASE, PROMPT, requires_cuda


@pytest.mark.parametrize("flag", ["enable_cpu_offload", "enable_layerwise_offload"])
def test_offload_on_cpu_device_is_an_error(tiny_flux_dir: str, flag: str) -> None:
    with pytest.raises(InvalidParameterError, match=f"{flag}=True needs a CUDA device"):
        Omni(model=tiny_flux_dir, device="cpu", **{flag: True})


def test_offload_options_are_mutually_exclusive(tiny_flux_dir: str) -> None:
    with pytest.raises(InvalidParameterError, match="mutually exclusive"):
        Omni(model=tiny_flux_dir, enable_cpu_offload=True, enable_layerwise_offload=True)


def generate(model: LoadedModel, seed: int = 5) -> list:
    """One request through a runner of the model as it was set up here (no engine, no other lever)."""
    params = model.adapter.resolve_params(OmniDiffusionSamplingParams(seed=seed, **BASE))
    request = Request(prompt=PROMPT, params=params)
    return ModelRunner(OmniDiffusionConfig(model=model.path), model=model).execute([request])[0].images


def test_model_offload_hooks_run_on_cpu_and_keep_output(tiny_flux_dir: str, plain_flux_images: list) -> None:
    model = load_model(tiny_flux_dir, device="cpu", keep_on_cpu=True)
    enable_model_offload(model.pipeline, torch.device("cpu"))
    hooked = [name for name in ("text_encoder", "text_encoder_2", "transformer", "vae")
              if hasattr(getattr(model.pipeline, name), "_hf_hook")]
    assert hooked == ["text_encoder", "text_encoder_2", "transformer", "vae"]
    assert max_abs_diff(generate(model)[0], plain_flux_images[0]) <= 1


def test_layerwise_offload_hooks_every_block_on_cpu_and_keeps_output(tiny_flux_dir: str,
                                                                      plain_flux_images: list) -> None:
    from diffusers.hooks import HookRegistry

    model = load_model(tiny_flux_dir, device="cpu", keep_on_cpu=True)
    transformer = model.pipeline.transformer
    enable_layerwise_offload(model.pipeline, [transformer], torch.device("cpu"))
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    assert all(HookRegistry.check_if_exists_or_initialize(b).get_hook("group_offloading") is not None
               for b in blocks)
    assert max_abs_diff(generate(model)[0], plain_flux_images[0]) <= 1


def cuda_run(folder: str, **levers) -> tuple[list, int, set[str]]:
    """Images, CUDA peak, and the devices of the transformer blocks' weights after the run."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with Omni(model=folder, device="cuda", dtype="float32", **levers) as omni:
        images = omni.generate(PROMPT, seed=5, **BASE)[0].images
        blocks = repeated_blocks(omni.engine.runner.model.pipeline.transformer)
        block_devices = {p.device.type for block in blocks for p in block.parameters()}
    return images, torch.cuda.max_memory_allocated(), block_devices


@requires_cuda
@pytest.mark.parametrize("flag", ["enable_cpu_offload", "enable_layerwise_offload"])
def test_offload_on_cuda_keeps_output_and_weights_off_device(tiny_flux_dir: str, flag: str) -> None:
    plain, plain_peak, _ = cuda_run(tiny_flux_dir)
    images, peak, block_devices = cuda_run(tiny_flux_dir, **{flag: True})
    assert max_abs_diff(images[0], plain[0]) <= 2
    # between calls the blocks' weights live in CPU memory (layerwise offload prefetches the transformer's
    # small top-level layers for the next call, so only the blocks are checked)
    assert block_devices == {"cpu"}
    assert peak <= plain_peak
