"""Overheads, measured in one process, warm, runs interleaved, medians:

- the engine's against diffusers' own pipeline (same folder, prompt, seed and params);
- with ``--caches``, each cache backend's when it is set never to skip, against ditserve uncached (what a cache
  costs on a request it cannot speed up).

``python -m ditserve.bench.overhead [FOLDER] [--runs N] [--caches]`` (default folder: the tiny random FLUX of
``ditserve.testing``, 20 steps with true CFG at 64x64). The prompt-embedding cache is off, so every system pays
its text encoders on every image.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(run: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(folder: str, runs: int, params: dict) -> dict[str, float]:
    from diffusers import DiffusionPipeline

    from ditserve import Omni

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    with Omni(model=folder, enable_prompt_embed_cache=False, enforce_eager=True) as omni:
        def ours() -> object:
            return omni.generate("a red circle", seed=0, **params)

        def theirs() -> object:
            return pipe("a red circle", generator=torch.Generator("cpu").manual_seed(0), **params)

        for warm_up in (ours, theirs, ours, theirs):
            warm_up()
        ours_s, theirs_s = [], []
        for _ in range(runs):  # interleaved, so a slow spell of the machine weighs on both
            ours_s.append(median_seconds(ours, 1))
            theirs_s.append(median_seconds(theirs, 1))
    ditserve_s, diffusers_s = statistics.median(ours_s), statistics.median(theirs_s)
    return {"ditserve_s": ditserve_s, "diffusers_s": diffusers_s, "speed_ratio": diffusers_s / ditserve_s}


#: a config of each backend under which it computes every step
NEVER_SKIP = {"tea_cache": {"rel_l1_thresh": 0.0}, "mag_cache": {"magcache_thresh": 0.0},
              "cache_dit": {"residual_diff_threshold": 0.0}}


def measure_cache_overheads(folder: str, runs: int, params: dict) -> dict[str, float]:
    """Denoising-time ratio (backend that never skips / uncached) per backend."""
    from ditserve import Omni

    engines = {"uncached": Omni(model=folder, enable_prompt_embed_cache=False, enforce_eager=True)}
    for name, config in NEVER_SKIP.items():
        engines[name] = Omni(model=folder, enable_prompt_embed_cache=False, enforce_eager=True,
                             cache_backend=name, cache_config=config)
    try:
        def denoise_s(omni: Omni) -> float:
            output = omni.generate("a red circle", seed=0, **params)[0]
            skipped = (output.cache_stats or {}).get("skipped_steps", 0)
            if skipped:
                raise RuntimeError(f"a never-skip config skipped {skipped} steps: the overhead would be wrong")
            return output.timings["denoise_s"]

        for omni in engines.values():
            denoise_s(omni)
        samples: dict[str, list[float]] = {name: [] for name in engines}
        for _ in range(runs):
            for name, omni in engines.items():
                samples[name].append(denoise_s(omni))
    finally:
        for omni in engines.values():
            omni.close()
    uncached = statistics.median(samples["uncached"])
    return {name: statistics.median(values) / uncached for name, values in samples.items() if name != "uncached"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ditserve.bench.overhead")
    parser.add_argument("folder", nargs="?", default=None)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--max-sequence-length", type=int, default=None, help="e.g. 32 for ditserve-shapes")
    parser.add_argument("--caches", action="store_true", help="also each cache backend's never-skip overhead")
    args = parser.parse_args()
    from ditserve.testing import tiny_pipeline_dir

    folder = args.folder or tiny_pipeline_dir("flux")
    params = {"height": args.size, "width": args.size, "num_inference_steps": args.steps,
              "true_cfg_scale": 3.0, "negative_prompt": ""}
    if args.max_sequence_length is not None:
        params["max_sequence_length"] = args.max_sequence_length
    result = measure(folder, args.runs, params)
    print(f"ditserve {result['ditserve_s'] * 1000:.1f} ms, diffusers {result['diffusers_s'] * 1000:.1f} ms per "
          f"image (medians of {args.runs}); diffusers/ditserve = {result['speed_ratio']:.3f}")
    if args.caches:
        for name, ratio in measure_cache_overheads(folder, args.runs, params).items():
            print(f"{name} set never to skip: denoising time x{ratio:.3f} of uncached ({(ratio - 1) * 100:+.1f} %)")


if __name__ == "__main__":
    main()
