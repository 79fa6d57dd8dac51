"""``python -m ditserve.bench ...``: the bench alone, for installs without the server's packages (a GPU box
that has torch, diffusers, transformers and cache-dit but not fastapi)."""

from __future__ import annotations

import argparse
import sys

from ditserve.bench.cli import register, route_bench_subcommand
from ditserve.entrypoints.cli import run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ditserve.bench")
    register(parser.add_subparsers(dest="command", required=True))
    words = route_bench_subcommand(["bench", *(sys.argv[1:] if argv is None else argv)])
    return run_command(parser.parse_args(words))


if __name__ == "__main__":
    sys.exit(main())
