"""``ditserve calibrate MODEL``: fit a model's cache coefficients and measure its quality table.

    ditserve calibrate path/to/model --steps 50 --num-prompts 8
    ditserve calibrate ditserve-shapes            # the demo model: prompts from its training language
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ditserve.cache.calibrate import DEFAULT_SWEEPS, calibrate
from ditserve.errors import InvalidParameterError

#: used for models other than the demo model when no --prompts file is given
GENERIC_PROMPTS = (
    "a red cat sitting on a windowsill", "a small blue circle at the center", "a green dog in the background",
    "a large red square at the top left", "a painting of a cat and a dog", "a blue triangle at the bottom right",
    "a green circle and a red square", "a small cat in the center of a large square",
)


def register(subparsers: Any) -> None:
    from ditserve.entrypoints.cli import add_engine_arguments

    parser = subparsers.add_parser("calibrate", help="fit cache coefficients and measure the quality table")
    parser.add_argument("model", help="diffusers folder, hub id, or ditserve-shapes")
    parser.add_argument("--prompts", default=None, help="text file, one prompt per line")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image", action="append", default=[], help="input image for edit models; repeatable")
    parser.add_argument("--backends", default=",".join(DEFAULT_SWEEPS),
                        help="backends whose quality table to measure (comma-separated; empty: fits only)")
    add_engine_arguments(parser)
    parser.set_defaults(func=run_calibrate)


def calibration_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    elif args.model == "ditserve-shapes":
        from ditserve.demo import sample_prompts

        prompts = sample_prompts(args.num_prompts, seed=args.seed)
    else:
        prompts = list(GENERIC_PROMPTS)
    if not prompts:
        raise InvalidParameterError("the prompt set is empty", param="prompts")
    return prompts[:args.num_prompts]


def chosen_sweeps(text: str) -> dict[str, tuple[float, ...]]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in DEFAULT_SWEEPS]
    if unknown:
        raise InvalidParameterError(f"--backends: unknown {unknown}; choose from {list(DEFAULT_SWEEPS)}",
                                    param="backends")
    return {n: DEFAULT_SWEEPS[n] for n in names}


def run_calibrate(args: argparse.Namespace) -> int:
    from ditserve.entrypoints.cli import engine_kwargs
    from ditserve.entrypoints.omni import Omni

    if args.cache_backend is not None or args.cache_config is not None:
        raise InvalidParameterError("calibrate runs the model uncached and sweeps every backend itself: "
                                    "drop --cache-backend / --cache-config", param="cache_backend")
    params = {"num_inference_steps": args.steps, "seed": args.seed}
    params |= {k: getattr(args, k) for k in ("height", "width") if getattr(args, k) is not None}
    prompt_items: list[Any] = calibration_prompts(args)
    if args.image:
        prompt_items = [{"prompt": p, "multi_modal_data": {"image": args.image}} for p in prompt_items]
    with Omni(**engine_kwargs(args)) as omni:
        data, path = calibrate(omni, prompt_items, params, chosen_sweeps(args.backends))
    print(format_report(data, path))
    return 0


def format_report(data: dict[str, Any], path: str) -> str:
    tea, mag = data["tea_cache"], data["mag_cache"]
    lines = [f"calibration written to {path}",
             f"tea_cache polynomial (degree {tea['fit']['degree']}, {tea['fit']['points']} points): "
             f"R^2={tea['fit']['r2']:.4f} rmse={tea['fit']['rmse']:.4g}",
             f"mag_cache ratios for {sorted(mag['mag_ratios'])}: mean std across prompts "
             f"{json.dumps({k: round(v, 5) for k, v in mag['fit']['mean_std_across_prompts'].items()})}"]
    for name, table in data["quality_table"].items():
        lines.append(f"{name}: {table['knob']} -> work, speed-up, PSNR mean/min (dB)")
        for row in table["rows"]:
            lines.append(f"  {row['value']:<6} work={row['work_fraction']:.3f} speedup={row['speedup']:.2f}x "
                         f"psnr={row['psnr_mean']:.2f}/{row['psnr_min']:.2f}")
    return "\n".join(lines)
