"""``ditserve calibrate MODEL``: fit a model's cache coefficients and search its quality table.

    ditserve calibrate path/to/model --steps 50 --num-prompts 4 --holdout-prompts 4
    ditserve calibrate ditserve-shapes            # the demo model: held-out prompts of its language
    ditserve calibrate ditserve-shapes-edit       # the edit demo: held-out edits with their input pictures
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ditserve.cache.calibrate import DEFAULT_BUDGET, MANY_KNOBS, CalibrationRun, calibrate
from ditserve.cache.search import config_key
from ditserve.cache.search import logger as search_logger
from ditserve.cache.selector import available_backends, backend_class
from ditserve.demo import DEMO_EDIT_MODEL_NAME, DEMO_MODEL_NAME
from ditserve.errors import InvalidParameterError

#: used for models other than the demo model when no --prompts file is given
GENERIC_PROMPTS = (
    "a red cat sitting on a windowsill", "a small blue circle at the center", "a green dog in the background",
    "a large red square at the top left", "a painting of a cat and a dog", "a blue triangle at the bottom right",
    "a green circle and a red square", "a small cat in the center of a large square",
)
#: the demo's calibration prompts are drawn from its held-out split (never trained on) with this seed; the bench
#: draws its own with seed 0, so the bench checks the calibration on prompts it never saw
DEMO_PROMPT_SEED = 1


def register(subparsers: Any) -> None:
    from ditserve.entrypoints.cli import add_engine_arguments

    parser = subparsers.add_parser("calibrate", help="fit cache coefficients and search the quality table")
    parser.add_argument("model", help="diffusers folder, hub id, or ditserve-shapes")
    parser.add_argument("--prompts", default=None, help="text file, one prompt per line (search prompts first, "
                                                        "then the held-out ones)")
    parser.add_argument("--num-prompts", type=int, default=4, help="prompts the search steers by")
    parser.add_argument("--holdout-prompts", type=int, default=4,
                        help="other prompts the front is measured on (the table's figures)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"denoising work each backend's search may spend, in uncached generations (a "
                             f"generation costs its work fraction; default {DEFAULT_BUDGET:g}, twice that for "
                             f"backends of {MANY_KNOBS} knobs or more)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="prompt i of each set runs with seed + i")
    parser.add_argument("--image", action="append", default=[], help="input image for edit models; repeatable")
    parser.add_argument("--backends", default=",".join(available_backends()),
                        help="backends whose knobs to search (comma-separated; empty: fits only)")
    parser.add_argument("--search-log", type=Path, default=None,
                        help="JSON file for every point the search measured (pruned ones included)")
    add_engine_arguments(parser)
    parser.set_defaults(func=run_calibrate)


def calibration_items(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    """The search items and the held-out items, disjoint: prompts, or prompts with their input pictures
    (``--image`` for every prompt; the edit demo's held-out edits each bring their own)."""
    wanted = args.num_prompts + args.holdout_prompts
    if args.model == DEMO_EDIT_MODEL_NAME and not args.prompts:
        if args.image:
            raise InvalidParameterError(f"--image: {DEMO_EDIT_MODEL_NAME}'s calibration edits bring their own input "
                                        "pictures; give --prompts to calibrate on your own", param="image")
        return _split(demo_edit_items(wanted), args)
    if args.prompts:
        prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    elif args.model == DEMO_MODEL_NAME:
        from ditserve.demo import heldout_prompts

        prompts = heldout_prompts(wanted, seed=DEMO_PROMPT_SEED)
    else:
        prompts = list(GENERIC_PROMPTS)
    if len(prompts) < wanted:
        raise InvalidParameterError(f"{len(prompts)} prompts for --num-prompts {args.num_prompts} + "
                                    f"--holdout-prompts {args.holdout_prompts}: give more with --prompts",
                                    param="prompts")
    if args.image:
        return _split([{"prompt": p, "multi_modal_data": {"image": args.image}} for p in prompts], args)
    return _split(prompts, args)


def demo_edit_items(count: int) -> list[dict[str, Any]]:
    """Held-out edits of the edit demo's language (seed DEMO_PROMPT_SEED), each with its input picture."""
    from ditserve.demo.edit_evaluation import heldout_edit_inputs

    edits, pictures = heldout_edit_inputs(count, DEMO_PROMPT_SEED)
    return [{"prompt": edit.instruction, "multi_modal_data": {"image": picture}}
            for edit, picture in zip(edits, pictures, strict=True)]


def _split(items: list[Any], args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    return items[:args.num_prompts], items[args.num_prompts:args.num_prompts + args.holdout_prompts]


def chosen_backends(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in available_backends()]
    if unknown:
        raise InvalidParameterError(f"--backends: unknown {unknown}; choose from {available_backends()}",
                                    param="backends")
    return names


def run_calibrate(args: argparse.Namespace) -> int:
    from ditserve.entrypoints.cli import engine_kwargs
    from ditserve.entrypoints.omni import Omni

    if args.cache_backend is not None or args.cache_config is not None:
        raise InvalidParameterError("calibrate runs the model uncached and searches every backend itself: "
                                    "drop --cache-backend / --cache-config", param="cache_backend")
    for flag in ("num_prompts", "holdout_prompts", "budget"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise InvalidParameterError(f"--{flag.replace('_', '-')} must be >= 1", param=flag)
    params = {"num_inference_steps": args.steps, "seed": args.seed}
    params |= {k: getattr(args, k) for k in ("height", "width") if getattr(args, k) is not None}
    search, holdout = calibration_items(args)
    # Each searched point's line is the command's progress (a search takes minutes): shown at the default
    # --log-level WARNING too; --log-level ERROR still silences it.
    if logging.getLogger().getEffectiveLevel() <= logging.WARNING:
        search_logger.setLevel(logging.INFO)
    with Omni(**engine_kwargs(args)) as omni:
        run = calibrate(omni, search, holdout, params, chosen_backends(args.backends), args.budget)
    if args.search_log is not None:
        write_search_log(run, args.search_log)
    print(format_report(run))
    return 0


def write_search_log(run: CalibrationRun, path: Path) -> None:
    log = {name: [{"config": e.config, "status": e.status.value, "reason": e.reason, "same_as": e.same_as,
                   "measurements": {str(i): vars(m) for i, m in sorted(e.measurements.items())}}
                  for e in calibrated.search.evaluations]
           for name, calibrated in run.backends.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(log, indent=1) + "\n")


def changed_knobs(name: str, config: dict[str, Any]) -> str:
    """The point's knobs that differ from the backend's defaults (the main threshold always shown)."""
    cls = backend_class(name)
    shown = {k: v for k, v in config.items()
             if k == cls.main_knob or config_key({k: v}) != config_key({k: cls.defaults.get(k)})}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def format_report(run: CalibrationRun) -> str:
    data = run.data
    tea, mag = data["tea_cache"], data["mag_cache"]
    lines = [f"calibration written to {run.path}",
             f"tea_cache polynomial (degree {tea['fit']['degree']}, {tea['fit']['points']} points): "
             f"R^2={tea['fit']['r2']:.4f} rmse={tea['fit']['rmse']:.4g}",
             f"mag_cache ratios for {sorted(mag['mag_ratios'])}: mean std across prompts "
             f"{json.dumps({k: round(v, 5) for k, v in mag['fit']['mean_std_across_prompts'].items()})}"]
    for name, calibrated in run.backends.items():
        table = calibrated.table
        lines.append(f"{name}: search {json.dumps(table.search)}")
        lines.append("  front over the search and held-out prompts: work (1/work), worst prompt of both sets (dB); "
                     "held-out mean / worst, search worst; knobs off their defaults")
        for p in table.front():
            lines.append(f"  work={p.work:.3f} ({1 / p.work:.2f}x) worst={p.worst_db:.2f}; held-out {p.psnr_mean:.2f}/"
                         f"{p.psnr_min:.2f}, search {p.search_psnr_min:.2f}  {changed_knobs(name, p.config)}")
    return "\n".join(lines)
