"""``ditserve bench --levers``: each lossless lever's speed and peak memory against the plain run.

The measuring itself is the levers' own ``measure_lever`` (plain and levered engines in this process, warm-up
first, medians); this module picks the levers, runs them one by one, and reports. A lever that cannot run here
(fp8 without a recent GPU, offload without an accelerator...) is listed with the error that says why.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ditserve.bench.runner import BenchOptions, choose_prompts
from ditserve.errors import DitServeError

#: each lever as the ``Omni`` options that turn it on
LEVERS: tuple[dict[str, Any], ...] = (
    {"enforce_eager": False},
    {"vae_use_slicing": True},
    {"vae_use_tiling": True},
    {"enable_cpu_offload": True},
    {"enable_layerwise_offload": True},
    {"quantization": "int8"},
    {"quantization": "fp8"},
)


def _lever_name(lever: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in lever.items())


def _measure_function() -> Any:
    try:
        from ditserve.levers.measure import measure_lever
    except ImportError as error:
        return error
    return measure_lever


def _measure_one(measure: Any, options: BenchOptions, lever: dict[str, Any], prompt: str) -> dict[str, Any]:
    params = {"num_inference_steps": options.steps, "seed": options.seed,
              **{k: v for k, v in (("height", options.height), ("width", options.width)) if v is not None}}
    base = {"device": options.device, "dtype": options.dtype}
    try:
        measured = measure(options.model, lever, prompt=prompt, params=params, runs=options.repeats, warmup=1,
                           base_kwargs=base)
    except (DitServeError, RuntimeError, ImportError) as error:
        return {"lever": _lever_name(lever), "status": "unavailable", "reason": f"{type(error).__name__}: {error}"}
    psnr = measured["psnr_db"]
    return {
        "lever": _lever_name(lever), "status": "ok", "speedup": measured["speedup"],
        "plain_median_s": measured["plain"]["median_s"], "lever_median_s": measured["levered"]["median_s"],
        "plain_peak_memory_mib": measured["plain"]["peak_memory_bytes"] / 2**20,
        "lever_peak_memory_mib": measured["levered"]["peak_memory_bytes"] / 2**20,
        "memory_ratio": measured["memory_ratio"], "memory_kind": measured["levered"]["memory_kind"],
        "warmup_s": measured["levered"]["warmup_s"], "psnr_db": None if math.isinf(psnr) else psnr,
        "bit_exact": measured["bit_exact"], "max_abs_diff": measured["max_abs_diff"],
    }


def run_levers(options: BenchOptions) -> dict[str, Any]:
    from ditserve.demo import DEMO_MODEL_NAME
    from ditserve.models.loader import resolve_device

    started = time.time()
    if options.cpu_threads is not None:
        import torch

        torch.set_num_threads(options.cpu_threads)
    measure = _measure_function()
    prompt = choose_prompts(options.model in (None, DEMO_MODEL_NAME), 1)[0]
    if isinstance(measure, ImportError):
        rows = [{"lever": _lever_name(lever), "status": "unavailable",
                 "reason": f"ditserve.levers.measure is not in this build: {measure}"} for lever in LEVERS]
    else:
        rows = [_measure_one(measure, options, lever, prompt) for lever in LEVERS]
    return {"model": options.model or DEMO_MODEL_NAME, "device": str(resolve_device(options.device)), "dtype": options.dtype,
            "steps": options.steps, "prompt": prompt, "runs": options.repeats, "seed": options.seed,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            "duration_s": time.time() - started, "levers": rows}


def _fmt(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def levers_markdown(results: dict[str, Any], command: str | None) -> str:
    lines = [f"# ditserve bench --levers: {results['model']}", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    lines += [f"- device {results['device']}, dtype {results['dtype']}, {results['steps']} steps, "
              f"median of {results['runs']} runs after a warm-up, prompt {results['prompt']!r}",
              f"- started {results['started']}", "",
              "| lever | speed-up | plain s | lever s | peak MiB plain | peak MiB lever | memory | PSNR dB | "
              "bit-exact |", "|---|---|---|---|---|---|---|---|---|"]
    for row in results["levers"]:
        if row["status"] != "ok":
            lines.append(f"| {row['lever']} | {row['status']}: {row['reason']} | | | | | | | |")
            continue
        lines.append(
            f"| {row['lever']} | {row['speedup']:.2f}x | {row['plain_median_s']:.3f} | {row['lever_median_s']:.3f} | "
            f"{row['plain_peak_memory_mib']:.0f} | {row['lever_peak_memory_mib']:.0f} | {row['memory_kind']} | "
            f"{'identical' if row['bit_exact'] else _fmt(row['psnr_db'], '{:.1f}')} | {row['bit_exact']} |")
    return "\n".join(lines) + "\n"


def write_levers(results: dict[str, Any], out_dir: Path, command: str | None = None) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "levers.json", "markdown": out_dir / "levers.md"}
    paths["json"].write_text(json.dumps({**results, "command": command}, indent=2, default=str) + "\n")
    paths["markdown"].write_text(levers_markdown(results, command))
    return paths
