"""The peers: diffusers' own cache hooks and the cache-dit library, applied to a plain diffusers pipeline.

Each method either applies to the model or raises ``MethodUnavailableError`` with the reason, so the report
lists it instead of silently dropping it.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ditserve.errors import UnknownKeyError, UnsupportedModelError

#: the cache methods diffusers' ``CacheMixin.enable_cache`` accepts, by the name the bench reports
DIFFUSERS_METHODS = ("FirstBlockCache", "TaylorSeerCache", "MagCache", "PyramidAttentionBroadcast", "FasterCache",
                     "SeaCache", "TextKVCache")
#: diffusers' hooks that raise on a denoiser call outside a ``cache_context`` (seen with FluxKontextPipeline,
#: which enters none; PyramidAttentionBroadcast, FasterCache and MagCache run there)
NEEDS_CACHE_CONTEXT = ("FirstBlockCache", "TaylorSeerCache")
#: our ``cache_dit`` config keys (the same as ditserve's ``cache_dit`` backend) that the library peer accepts
CACHE_DIT_KEYS = ("Fn_compute_blocks", "Bn_compute_blocks", "max_warmup_steps", "residual_diff_threshold",
                  "max_continuous_cached_steps", "max_cached_steps", "enable_taylorseer", "taylorseer_order",
                  "scm_steps_mask_policy", "scm_steps_policy", "enable_separate_cfg")


class MethodUnavailableError(UnsupportedModelError):
    """A cache method that cannot run on this model or in this build; the message is the reason."""


def _check_enable_cache(transformer: torch.nn.Module) -> None:
    if not hasattr(transformer, "enable_cache"):
        raise MethodUnavailableError(f"{type(transformer).__name__} has no enable_cache (not a diffusers CacheMixin)")


def _sea_cache_applies(pipeline: Any) -> None:
    # SeaCache needs the step index and sigma in every cache_context; a pipeline that does not pass them makes
    # it run "fail-open", skipping nothing, which would be a misleading row
    source = inspect.getsource(type(pipeline).__call__)
    if "cache_context(" not in source or "sigma=" not in source:
        raise MethodUnavailableError(
            f"{type(pipeline).__name__}.__call__ passes no step_index/sigma to cache_context: "
            "SeaCache would run fail-open and skip nothing")


def _enters_cache_context(pipeline: Any, method: str) -> None:
    # these hooks keep their state per cache_context and raise on a denoiser call outside one (the others run)
    if "cache_context(" not in inspect.getsource(type(pipeline).__call__):
        raise MethodUnavailableError(f"{type(pipeline).__name__}.__call__ calls its transformer outside a "
                                     f"cache_context, where diffusers' {method} hook raises on the first step")


def _text_kv_cache_applies(transformer: torch.nn.Module) -> None:
    from diffusers.models.transformers.transformer_nucleusmoe_image import NucleusMoEImageTransformerBlock

    if not any(isinstance(m, NucleusMoEImageTransformerBlock) for m in transformer.modules()):
        raise MethodUnavailableError(
            f"TextKVCache only hooks NucleusMoEImageTransformerBlock; {type(transformer).__name__} has none")


def diffusers_hook_config(method: str, config: Mapping[str, Any], pipeline: Any, num_steps: int,
                          mag_ratios: list[float] | None = None) -> Any:
    """The diffusers config object of ``method`` with the bench's ``config`` fields, ready for enable_cache."""
    from diffusers import hooks

    transformer = pipeline.transformer
    _check_enable_cache(transformer)
    if method in NEEDS_CACHE_CONTEXT:
        _enters_cache_context(pipeline, method)
    options = dict(config)

    def current_timestep() -> Any:
        return pipeline.current_timestep

    if method == "FirstBlockCache":
        return hooks.FirstBlockCacheConfig(**options)
    if method == "TaylorSeerCache":
        return hooks.TaylorSeerCacheConfig(**options)
    if method == "MagCache":
        if mag_ratios is None:
            raise MethodUnavailableError("MagCache needs magnitude ratios: calibration produced none")
        return hooks.MagCacheConfig(num_inference_steps=num_steps, mag_ratios=mag_ratios, **options)
    if method == "PyramidAttentionBroadcast":
        return hooks.PyramidAttentionBroadcastConfig(current_timestep_callback=current_timestep, **options)
    if method == "FasterCache":
        # the pipeline runs guidance as separate passes (no batched uncond branch to skip): attention reuse only
        return hooks.FasterCacheConfig(current_timestep_callback=current_timestep, is_guidance_distilled=True,
                                       **options)
    if method == "SeaCache":
        _sea_cache_applies(pipeline)
        return hooks.SeaCacheConfig(**options)
    if method == "TextKVCache":
        _text_kv_cache_applies(transformer)
        return hooks.TextKVCacheConfig(**options)
    raise MethodUnavailableError(f"unknown diffusers cache method {method!r}; known: {list(DIFFUSERS_METHODS)}")


@contextlib.contextmanager
def diffusers_cache(pipeline: Any, hook_config: Any) -> Any:
    """Enable a diffusers cache hook for the block, and always remove it after."""
    pipeline.transformer.enable_cache(hook_config)
    try:
        yield
    finally:
        pipeline.transformer.disable_cache()


def calibrate_diffusers_mag_ratios(pipeline: Any, num_steps: int, generate_once: Callable[[], Any]) -> list[float]:
    """diffusers' own MagCache calibration (``calibrate=True``), run once on the bench's first prompt: the
    peer gets ratios measured on this model, the procedure its documentation prescribes."""
    from diffusers.hooks import MagCacheConfig

    printed = io.StringIO()
    with diffusers_cache(pipeline, MagCacheConfig(calibrate=True, num_inference_steps=num_steps)), \
            contextlib.redirect_stdout(printed):
        generate_once()
    # diffusers prints the ratio list of each cache context (cond first) after "Calibration Complete"
    lines = printed.getvalue().splitlines()
    for index, line in enumerate(lines[:-1]):
        if "Calibration Complete" in line:
            return [float(r) for r in ast.literal_eval(lines[index + 1].strip())]
    raise MethodUnavailableError("diffusers' MagCache calibration printed no ratios")


def cache_dit_arguments(config: Mapping[str, Any], num_steps: int) -> dict[str, Any]:
    """``cache_dit.enable_cache`` keyword arguments for a config written with our ``cache_dit`` keys."""
    import cache_dit

    unknown = set(config) - set(CACHE_DIT_KEYS)
    if unknown:
        raise UnknownKeyError("cache-dit peer config", unknown, CACHE_DIT_KEYS)
    options = dict(config)
    taylorseer = options.pop("enable_taylorseer", False)
    order = options.pop("taylorseer_order", 1)
    mask_policy = options.pop("scm_steps_mask_policy", None)
    steps_policy = options.pop("scm_steps_policy", "dynamic")
    if mask_policy is not None:
        options["steps_computation_mask"] = cache_dit.steps_mask(mask_policy=mask_policy, total_steps=num_steps)
        options["steps_computation_policy"] = steps_policy
    cache_config = cache_dit.DBCacheConfig(num_inference_steps=num_steps, **options)
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order) if taylorseer else None
    return {"cache_config": cache_config, "calibrator_config": calibrator}


@contextlib.contextmanager
def cache_dit_library(pipeline: Any, arguments: Mapping[str, Any]) -> Any:
    """cache-dit on the diffusers pipeline for the block; disabled even if a run raises (the library would
    otherwise leave the pipeline patched)."""
    import cache_dit

    cache_dit.enable_cache(pipeline, **arguments)
    try:
        yield
    finally:
        cache_dit.disable_cache(pipeline)
