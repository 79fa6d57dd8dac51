"""Lossless levers applied to a loaded model: quantization, CPU offload, VAE slicing/tiling, regional compile.

The runner loads with :func:`load_options` (what must be decided before weights are read or placed) and then
calls :func:`apply_levers` once. Every lever the config asks for is applied or refused with an error that says
why; none is silently skipped.
"""

from __future__ import annotations

from typing import Any

import torch

from ditserve.config import OmniDiffusionConfig
from ditserve.errors import InvalidParameterError
from ditserve.levers.compile import compile_repeated_blocks
from ditserve.levers.offload import enable_layerwise_offload, enable_model_offload, require_accelerator
from ditserve.levers.vae import enable_vae_slicing, enable_vae_tiling
from ditserve.models.loader import LoadedModel


def load_options(config: OmniDiffusionConfig) -> dict[str, Any]:
    """Keyword arguments of ``load_model`` that the levers need: offloaded weights must not be moved to the
    device first (a model that needs offloading does not fit there), and a GGUF transformer replaces the
    folder's transformer without reading the latter."""
    return {"keep_on_cpu": config.enable_cpu_offload or config.enable_layerwise_offload,
            "gguf_model": config.gguf_model if config.quantization == "gguf" else None}


def apply_levers(model: LoadedModel, config: OmniDiffusionConfig) -> None:
    """Apply every lever the config asks for, in the order they compose: weights are quantized while they sit
    where they were loaded, then placed (or offloaded), then the VAE is set up, and compiling comes last so that
    it traces the final modules."""
    _check_combinations(config)
    if config.quantization is not None:
        _quantize(model, config)
    _place(model, config)
    if config.vae_use_slicing:
        enable_vae_slicing(model.pipeline)
        model.levers.append("vae_slicing")
    if config.vae_use_tiling:
        enable_vae_tiling(model.pipeline)
        model.levers.append("vae_tiling")
    if wants_compile(config, model.device):
        _compile(model)


def wants_compile(config: OmniDiffusionConfig, device: torch.device) -> bool:
    """``enforce_eager=None`` is "auto": compile on CUDA and stay eager on CPU (measurements in ``compile.py``),
    and never together with layerwise offload, which compiled blocks cannot trace."""
    if config.enforce_eager is None:
        return device.type == "cuda" and not config.enable_layerwise_offload
    return not config.enforce_eager


def _check_combinations(config: OmniDiffusionConfig) -> None:
    """Refuse, before any work, options that cannot apply together."""
    if config.enforce_eager is False and config.enable_layerwise_offload:
        # the offload hooks move weights inside each block's call: compiling the blocks would trace those device
        # copies into the graphs
        raise InvalidParameterError(
            "enforce_eager=False cannot be combined with enable_layerwise_offload; use enable_cpu_offload "
            "(model-level) with compile, or keep enforce_eager=True", param="enforce_eager")
    if config.ignored_layers and config.quantization not in ("fp8", "int8"):
        raise InvalidParameterError(
            f"ignored_layers only applies to quantization='fp8' or 'int8' (got quantization={config.quantization!r})",
            param="ignored_layers")


def _quantize(model: LoadedModel, config: OmniDiffusionConfig) -> None:
    if config.quantization == "gguf":
        _use_gguf_transformer(model, config)
        return
    ignored = list(config.ignored_layers or [])
    transformers = model.adapter.transformers()
    _check_patterns_match(transformers, ignored)
    if config.quantization == "fp8":
        from ditserve.levers.fp8 import quantize_linears_fp8, require_fp8_device

        require_fp8_device(model.device)
        for transformer in transformers:
            quantize_linears_fp8(transformer, ignored)
    else:
        from ditserve.levers.int8 import quantize_linears_int8

        for transformer in transformers:
            quantize_linears_int8(transformer, ignored)
    model.levers.append(f"quantization={config.quantization}")


def _check_patterns_match(transformers: list[torch.nn.Module], ignored: list[str]) -> None:
    from ditserve.levers.fp8 import unmatched_patterns

    unmatched = [p for p in ignored if all(unmatched_patterns(t, [p]) for t in transformers)]
    if unmatched:
        raise InvalidParameterError(
            f"ignored_layers {unmatched} name no layer of the transformer (module names look like "
            "'transformer_blocks.0.attn.to_q' or globs such as '*.proj_out')", param="ignored_layers")


def _use_gguf_transformer(model: LoadedModel, config: OmniDiffusionConfig) -> None:
    """The loader reads the GGUF file when given :func:`load_options`; a model loaded without them gets its
    transformer replaced here (the folder's transformer was then read for nothing)."""
    from ditserve.levers.gguf import is_gguf_quantized, load_gguf_transformer

    if model.adapter.transformer_names != ("transformer",):
        raise InvalidParameterError(
            f"quantization='gguf' replaces one transformer; {model.adapter.pipeline_class_name} has "
            f"{list(model.adapter.transformer_names)}", param="quantization")
    pipeline = model.pipeline
    if not is_gguf_quantized(pipeline.transformer):
        transformer = load_gguf_transformer(model.path, config.gguf_model, model.dtype)
        on_cpu = pipeline.transformer.device.type == "cpu"
        pipeline.register_modules(transformer=transformer if on_cpu else transformer.to(model.device))
    model.levers.append("quantization=gguf")


def _place(model: LoadedModel, config: OmniDiffusionConfig) -> None:
    if config.enable_cpu_offload:
        require_accelerator(model.device, "enable_cpu_offload")
        enable_model_offload(model.pipeline, model.device)
        model.levers.append("cpu_offload")
    elif config.enable_layerwise_offload:
        require_accelerator(model.device, "enable_layerwise_offload")
        enable_layerwise_offload(model.pipeline, model.adapter.transformers(), model.device)
        model.levers.append("layerwise_offload")


def _compile(model: LoadedModel) -> None:
    for transformer in model.adapter.transformers():
        compile_repeated_blocks(transformer)
    model.levers.append("regional_compile")
