"""Measure one lever against the plain run of the same model: speed, peak memory, and output difference.

Both runs happen in this process, one after the other, on the same prompt and seed, each with warm-up runs
first (a compiled model's first call compiles). Memory is the CUDA allocator's peak on a GPU, else the
process's peak resident set (Linux ``VmHWM``, reset before each phase), which includes the process's baseline
(libraries, Python), so its ratio understates what the lever saves on the model itself.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditserve.errors import InvalidParameterError

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif _CLEAR_REFS.exists():
        # "5" resets the kernel's high-water mark of this process's resident set
        _CLEAR_REFS.write_text("5")


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """The peak since the last reset, and what it measures."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024, "peak_rss"
    import resource

    # no /proc: the lifetime peak (never reset), an upper bound
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "lifetime_peak_rss"


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor really holds: quantized tensor subclasses (torchao) are counted by their packed parts."""
    parts = [getattr(tensor, name, None) for name in (*getattr(tensor, "tensor_data_names", ()),
                                                      *getattr(tensor, "optional_tensor_data_names", ()))]
    if parts:
        return sum(tensor_bytes(part) for part in parts if part is not None)
    return tensor.numel() * tensor.element_size()


def transformer_weight_bytes(transformers: list[torch.nn.Module]) -> int:
    """Bytes of the transformers' parameters and buffers, as stored (packed when quantized)."""
    return sum(tensor_bytes(t) for module in transformers
               for t in (*module.parameters(), *module.buffers()))


def output_arrays(outputs: list[Any]) -> list[np.ndarray]:
    """Every image or video of a list of ``RequestOutput`` as uint8 arrays, in order."""
    arrays = []
    for output in outputs:
        arrays += [np.asarray(image, dtype=np.uint8) for image in output.images]
        arrays += [np.asarray(video, dtype=np.uint8) for video in output.videos]
    return arrays


def psnr_db(reference: list[np.ndarray], other: list[np.ndarray]) -> float:
    """PSNR of ``other`` against ``reference`` over all their pixels (``inf`` when identical)."""
    ref = np.concatenate([a.reshape(-1) for a in reference]).astype(np.float64)
    out = np.concatenate([a.reshape(-1) for a in other]).astype(np.float64)
    mse = float(np.mean((ref - out) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def run_phase(omni_kwargs: Mapping[str, Any], prompt: str, params: Mapping[str, Any], runs: int,
              warmup: int) -> dict[str, Any]:
    """Build an engine, run ``warmup`` then ``runs`` generations, and close it."""
    from ditserve.entrypoints.omni import Omni
    from ditserve.models.loader import resolve_device

    device = resolve_device(omni_kwargs.get("device", "auto"))
    gc.collect()
    reset_peak_memory(device)
    start = time.perf_counter()
    with Omni(**omni_kwargs) as omni:
        load_s = time.perf_counter() - start
        first_start = time.perf_counter()
        for _ in range(warmup):
            omni.generate(prompt, dict(params))
        warmup_s = time.perf_counter() - first_start
        times, outputs = [], []
        for _ in range(runs):
            run_start = time.perf_counter()
            outputs = omni.generate(prompt, dict(params))
            times.append(time.perf_counter() - run_start)
        weight_bytes = transformer_weight_bytes(omni.engine.adapter.transformers())
        # a multi-process runner keeps its model in the workers: no list of levers here
        levers = list(getattr(getattr(omni.engine.runner, "model", None), "levers", []))
    peak, memory_kind = peak_memory_bytes(device)
    return {"median_s": statistics.median(times), "times_s": times, "load_s": load_s, "warmup_s": warmup_s,
            "peak_memory_bytes": peak, "memory_kind": memory_kind, "transformer_weight_bytes": weight_bytes,
            "levers": levers,
            "arrays": output_arrays(outputs)}


def measure_lever(model_path: str | None, lever_kwargs: Mapping[str, Any], *, prompt: str = "a red circle",
                  params: Mapping[str, Any] | None = None, runs: int = 3, warmup: int = 1,
                  base_kwargs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Speed, peak memory and quality of ``Omni(model_path, **base_kwargs, **lever_kwargs)`` against
    ``Omni(model_path, **base_kwargs)``.

    ``params``: sampling params of every run (give a ``seed`` so both phases denoise the same noise; 0 is used
    otherwise). Returns ``{"lever", "plain", "levered", "speedup", "memory_ratio", "weight_ratio", "psnr_db",
    "max_abs_diff", "bit_exact"}``; ``plain`` and ``levered`` hold ``median_s``, ``times_s``, ``load_s``,
    ``warmup_s`` (includes compiling), ``peak_memory_bytes``, ``memory_kind``, ``transformer_weight_bytes`` (as
    stored: packed when quantized) and ``levers`` (what was applied).
    """
    if runs < 1 or warmup < 0:
        raise InvalidParameterError(f"runs={runs} must be >= 1 and warmup={warmup} >= 0", param="runs")
    params = {"seed": 0, **dict(params or {})}
    base = {"model": model_path, **dict(base_kwargs or {})}
    plain = run_phase(base, prompt, params, runs, warmup)
    levered = run_phase({**base, **dict(lever_kwargs)}, prompt, params, runs, warmup)
    plain_arrays, lever_arrays = plain.pop("arrays"), levered.pop("arrays")
    max_abs = max(int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
                  for a, b in zip(plain_arrays, lever_arrays, strict=True))
    return {"lever": dict(lever_kwargs), "plain": plain, "levered": levered,
            "speedup": plain["median_s"] / levered["median_s"],
            "memory_ratio": levered["peak_memory_bytes"] / plain["peak_memory_bytes"],
            "weight_ratio": levered["transformer_weight_bytes"] / plain["transformer_weight_bytes"],
            "psnr_db": psnr_db(plain_arrays, lever_arrays), "max_abs_diff": max_abs, "bit_exact": max_abs == 0}
