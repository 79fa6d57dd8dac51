"""The engine's overhead against diffusers' own pipeline: same folder, prompt, seed and params, same process,
warm, runs interleaved, medians. ``python -m ditserve.bench.overhead [FOLDER] [--runs N]`` (default: the tiny
random FLUX of ``ditserve.testing``, 20 steps with true CFG at 64x64). The prompt-embedding cache is off, so
both pay their text encoders on every image.
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


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ditserve.bench.overhead")
    parser.add_argument("folder", nargs="?", default=None)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    from ditserve.testing import tiny_pipeline_dir

    folder = args.folder or tiny_pipeline_dir("flux")
    params = {"height": args.size, "width": args.size, "num_inference_steps": args.steps,
              "true_cfg_scale": 3.0, "negative_prompt": ""}
    result = measure(folder, args.runs, params)
    print(f"ditserve {result['ditserve_s'] * 1000:.1f} ms, diffusers {result['diffusers_s'] * 1000:.1f} ms per "
          f"image (medians of {args.runs}); diffusers/ditserve = {result['speed_ratio']:.3f}")


if __name__ == "__main__":
    main()
