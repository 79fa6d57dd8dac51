"""``ditserve bench [MODEL]``: speed against quality, ours and the peers, in one run."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from ditserve.errors import InvalidParameterError

#: defaults of the full run (the demo model's real figures)
FULL_DEFAULTS = {"steps": 50, "num_prompts": 4, "repeats": 2, "height": None, "width": None}
#: defaults of --quick: a tiny random FLUX pipeline, few steps, small images (seconds, not minutes)
QUICK_DEFAULTS = {"steps": 4, "num_prompts": 2, "repeats": 1, "height": 64, "width": 64}


def register(subparsers: Any) -> None:
    register_serve(subparsers)
    register_scale(subparsers)
    parser = subparsers.add_parser("bench", help="benchmark caches of ditserve against diffusers and cache-dit "
                                                 "('ditserve bench serve --help': the serving benchmark)")
    parser.add_argument("model", nargs="?", default=None, help="diffusers folder or hub id (default: the demo)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; --quick: 4)")
    parser.add_argument("--prompts", dest="num_prompts", type=int, default=None,
                        help="number of prompts (default 4; --quick: 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed images per prompt and setting (default 2; --quick: 1)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i in every system")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-frames", type=int, default=None, help="frames of each video (video models only; "
                                                                      "default: the model's)")
    parser.add_argument("--true-cfg-scale", type=float, default=None)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="torch CPU threads for every system (default: torch's own choice)")
    parser.add_argument("--search-peers", type=float, default=0, metavar="BUDGET",
                        help="search the knobs of the peers that expose them (diffusers' FirstBlockCache, MagCache, "
                             "TaylorSeerCache; the cache-dit library) on our calibration's search prompts, BUDGET "
                             "uncached generations of denoising work each (a generation costs its work fraction; "
                             "twice that for spaces of 3 knobs or more, as ours get in 'ditserve "
                             "calibrate'; "
                             "0: their fixed sweeps, the default), and run their fronts")
    parser.add_argument("--only", nargs="*", default=[], help="run only settings whose label has one of these words")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run in seconds on a tiny random FLUX model (unless MODEL is given)")
    parser.add_argument("--levers", action="store_true",
                        help="measure the lossless levers (speed, peak memory) instead of the caches")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md, pareto.png")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.set_defaults(func=run_from_args)


def _check_at_least_one(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InvalidParameterError(f"{flag}={value} must be >= 1", param=flag.removeprefix("--").replace("-", "_"))


def _sized_options(args: argparse.Namespace) -> dict[str, Any]:
    """steps, prompts, repeats and size: what the user gave, else the defaults of the chosen mode."""
    defaults = QUICK_DEFAULTS if args.quick else FULL_DEFAULTS
    values = {name: default if getattr(args, name) is None else getattr(args, name)
              for name, default in defaults.items()}
    for name in ("steps", "num_prompts", "repeats"):
        _check_at_least_one("--" + name.removeprefix("num_"), values[name])
    return values


def options_from_args(args: argparse.Namespace) -> Any:
    from ditserve.bench.runner import BenchOptions

    for flag in ("--cpu-threads", "--num-frames"):
        _check_at_least_one(flag, getattr(args, flag.removeprefix("--").replace("-", "_")))
    if args.search_peers < 0:
        raise InvalidParameterError(f"--search-peers={args.search_peers} must be >= 0", param="search_peers")
    model = args.model
    if args.quick and model is None:
        from ditserve.testing import tiny_pipeline_dir

        model = tiny_pipeline_dir("flux")
    return BenchOptions(
        model=model, seed=args.seed, device=args.device, dtype=args.dtype, true_cfg_scale=args.true_cfg_scale,
        negative_prompt=args.negative_prompt, num_frames=args.num_frames, quick=args.quick, show_progress=args.progress,
        only=tuple(args.only), cpu_threads=args.cpu_threads, search_peers=args.search_peers, **_sized_options(args))


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, rebuilt from the parsed options (recorded with the results)."""
    words = ["ditserve", "bench"] + ([args.model] if args.model else [])
    for flag in ("steps", "num_prompts", "repeats", "seed", "height", "width", "num_frames", "true_cfg_scale",
                 "negative_prompt", "dtype", "device", "cpu_threads", "search_peers"):
        value = getattr(args, flag)
        if value is not None:
            words += ["--prompts" if flag == "num_prompts" else "--" + flag.replace("_", "-"), str(value)]
    if args.only:
        words += ["--only", *args.only]
    words += [f for f, on in (("--quick", args.quick), ("--levers", args.levers)) if on]
    words += ["--out", str(args.out)]
    return " ".join(shlex.quote(w) for w in words)


def run_from_args(args: argparse.Namespace) -> int:
    command = command_line(args)
    options = options_from_args(args)
    if args.levers:
        from ditserve.bench.levers import run_levers, write_levers

        paths = write_levers(run_levers(options), args.out, command)
    else:
        from ditserve.bench.report import summary_text, write_outputs
        from ditserve.bench.runner import run_bench

        results = run_bench(options)
        paths = write_outputs(results, args.out, command)
        for line in results["summary"]:
            print(summary_text(line))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


#: ``ditserve bench serve ...`` is parsed as this sub-command (``bench`` itself takes a model name first)
SERVE_COMMAND = "bench-serve"
#: ``ditserve bench scale ...`` likewise
SCALE_COMMAND = "bench-scale"
#: the words after ``bench`` that name a benchmark of their own, and the sub-command each is parsed as
BENCH_SUBCOMMANDS = {"serve": SERVE_COMMAND, "scale": SCALE_COMMAND}


def route_bench_subcommand(argv: list[str]) -> list[str]:
    """``bench serve ...`` -> ``bench-serve ...`` (and ``scale``); any other command line stays as it is."""
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCH_SUBCOMMANDS:
        return [BENCH_SUBCOMMANDS[argv[1]], *argv[2:]]
    return argv


def register_scale(subparsers: Any) -> None:
    from ditserve.bench.scale_cli import add_arguments, run_from_args

    parser = subparsers.add_parser(SCALE_COMMAND, help="full-size architectures on a GPU: step, levers, VAE, memory "
                                                       "(same as: ditserve bench scale)")
    add_arguments(parser)
    parser.set_defaults(func=run_from_args, scale_prefix=("ditserve", "bench", "scale"))


def register_serve(subparsers: Any) -> None:
    parser = subparsers.add_parser(SERVE_COMMAND, help="the serving benchmark (same as: ditserve bench serve)")
    parser.add_argument("model", nargs="?", default=None, help="diffusers folder or hub id (default: the demo)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--height", type=int, default=128, help="square image size of every request")
    parser.add_argument("--requests", type=int, default=40, help="requests per mode and rate")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.8],
                        help="arrival rates as fractions of the one-at-a-time capacity")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30], help="step counts of the mix")
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md, latency.png")
    parser.set_defaults(func=run_serve_from_args)


def run_serve_from_args(args: argparse.Namespace) -> int:
    from ditserve.bench.serve import ServeBenchOptions, run_serve_bench, write_serve_results

    for name in ("requests", "max_batch_size", "height"):
        _check_at_least_one("--" + name.replace("_", "-"), getattr(args, name))
    if any(rate <= 0 for rate in args.rates):
        raise InvalidParameterError(f"--rates {args.rates}: every rate must be > 0", param="rates")
    for steps in args.steps:
        _check_at_least_one("--steps", steps)
    options = ServeBenchOptions(model=args.model, device=args.device, height=args.height, requests=args.requests,
                                rates=tuple(args.rates), steps=tuple(args.steps),
                                max_batch_size=args.max_batch_size, seed=args.seed)
    words = ["ditserve", "bench", "serve", *([args.model] if args.model else []), "--requests", str(args.requests),
             "--rates", *map(str, args.rates), "--steps", *map(str, args.steps), "--max-batch-size",
             str(args.max_batch_size), "--height", str(args.height), "--seed", str(args.seed), "--out", str(args.out)]
    paths = write_serve_results(run_serve_bench(options), args.out, " ".join(shlex.quote(w) for w in words))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
