"""The command line of ``ditserve bench scale`` / ``python -m ditserve.bench.scale``.

Kept apart from ``scale`` so that registering the sub-command (every ``ditserve`` start) imports no torch.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ditserve.bench.scale_report import (
    DERIVED_STEPS,
    JSON_NAME,
    MARKDOWN_NAME,
    MODEL_NAMES,
    Row,
    Status,
    markdown,
)
from ditserve.errors import InvalidParameterError

ROW_NAMES = tuple(row.value for row in Row)


def _names(flag: str, text: str, allowed: Sequence[str]) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise InvalidParameterError(f"{flag} {text!r}: {unknown or 'nothing'} is not one of {list(allowed)}",
                                    param=flag.removeprefix("--").replace("-", "_"))
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODEL_NAMES), help=f"comma-separated, of {list(MODEL_NAMES)}")
    parser.add_argument("--rows", default=None,
                        help=f"comma-separated, of {list(ROW_NAMES)} (default: all; on a CPU the compile rows run "
                             "only when named)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="plan the rows cheapest first and run only those whose expected cost fits the seconds "
                             "left; the others are recorded with the reason (default: no limit)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per row (the first is timed apart)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per transformer row (median reported)")
    parser.add_argument("--dry-run", "--quick", dest="dry_run", action="store_true",
                        help="the same code at a tiny scale (a few narrow blocks, 64x64): seconds on a CPU")
    parser.add_argument("--device", default="auto", help="auto, cuda, cuda:1, cpu (cpu: --dry-run only)")
    parser.add_argument("--frames", type=int, default=None,
                        help="Wan's frame count at full scale (4k+1; default 81) where 81 frames do not fit")
    parser.add_argument("--out", type=Path, required=True, help=f"folder for {JSON_NAME} and {MARKDOWN_NAME}")


def options_from_args(args: argparse.Namespace, command: str) -> Any:
    from ditserve.bench.scale import ScaleOptions

    if args.warmup < 1 or args.repeats < 1:
        raise InvalidParameterError(f"--warmup {args.warmup} and --repeats {args.repeats} must both be >= 1",
                                    param="warmup" if args.warmup < 1 else "repeats")
    if args.warmup + args.repeats >= DERIVED_STEPS:
        # every row steps one request of a DERIVED_STEPS-step schedule, which must not end while it is timed
        raise InvalidParameterError(
            f"--warmup + --repeats = {args.warmup + args.repeats} must be below {DERIVED_STEPS}", param="repeats")
    if args.budget_s is not None and args.budget_s <= 0:
        raise InvalidParameterError(f"--budget-s {args.budget_s} must be > 0", param="budget_s")
    if args.frames is not None and (args.frames < 5 or (args.frames - 1) % 4):
        raise InvalidParameterError(
            f"--frames {args.frames} must be 4k+1 and >= 5 (Wan's VAE compresses time by 4)", param="frames")
    rows = None if args.rows is None else [Row(name) for name in _names("--rows", args.rows, ROW_NAMES)]
    return ScaleOptions(models=_names("--models", args.models, MODEL_NAMES), rows=rows, budget_s=args.budget_s,
                        warmup=args.warmup, repeats=args.repeats, dry_run=args.dry_run, device=args.device,
                        frames=args.frames, out=args.out, command=command)


def command_line(prefix: Sequence[str], args: argparse.Namespace) -> str:
    """The command that reproduces this run, rebuilt from the parsed options (recorded with the results)."""
    words = [*prefix, "--models", args.models]
    words += ["--rows", args.rows] if args.rows else []
    words += ["--budget-s", f"{args.budget_s:g}"] if args.budget_s is not None else []
    words += ["--warmup", str(args.warmup), "--repeats", str(args.repeats), "--device", args.device]
    words += ["--frames", str(args.frames)] if args.frames is not None else []
    words += ["--dry-run"] if args.dry_run else []
    return shlex.join([*words, "--out", str(args.out)])


def run_from_args(args: argparse.Namespace) -> int:
    from ditserve.bench.scale import run_scale

    results = run_scale(options_from_args(args, command_line(args.scale_prefix, args)))
    measured = sum(r.status is Status.OK for r in results.rows)
    print(markdown(results))
    print(f"wrote {args.out / MARKDOWN_NAME} and {JSON_NAME}: {measured} of {len(results.rows)} rows measured")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from ditserve.entrypoints.cli import run_command

    parser = argparse.ArgumentParser(prog="python -m ditserve.bench.scale",
                                     description="full-size transformers on a GPU: step, levers, VAE, memory")
    add_arguments(parser)
    parser.set_defaults(func=run_from_args, scale_prefix=("python", "-m", "ditserve.bench.scale"))
    return run_command(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))
