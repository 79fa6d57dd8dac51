"""Seconds per training step of the edit demo model, launched three ways on the same machine: one process on one
thread, one process on all the threads it is given, and as many one-thread processes under torchrun (data parallel,
``ditserve.demo.data_parallel``). Each run continues the bundled edit model for ``--steps`` steps at the given
batch and reads the seconds its log records between step ``--steps // 3`` and the last logged step; nothing else
should run beside it. Not a test: about 2 minutes on a 2-core CPU.

    PYTHONPATH=. .venv/bin/python benchmarks/data_parallel_training.py --processes 2 --out docs/benchmarks/DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def seconds_per_step(log: Path, first: int, last: int) -> float:
    """Mean seconds a step between two logged steps of a trainer's log.jsonl."""
    seconds = {r["step"]: r["seconds"] for r in map(json.loads, log.read_text().splitlines()) if "loss" in r}
    return (seconds[last] - seconds[first]) / (last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="processes (and threads) of the parallel runs")
    parser.add_argument("--steps", type=int, default=31)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    log_every = max(1, (args.steps - 1) // 3)
    first, last = log_every, log_every * ((args.steps - 1) // log_every)
    n = args.processes
    # run 8 of the shipped edit model's settings: the object probe and the change read-out cost their share
    training = ["train", "--task", "edit", "--init-from", "ditserve/demo/ditserve-shapes-edit", "--steps",
                str(args.steps), "--batch", str(args.batch), "--log-every", str(log_every), "--probe-weight", "0.3",
                "--change-weight", "4", "--change-probe-weight", "0.3", "--lr", "4e-4", "--seed", "8"]
    modes = {
        "one process, 1 thread": (["-m", "ditserve.demo"], 1),
        f"one process, {n} threads": (["-m", "ditserve.demo"], n),
        f"{n} processes (torchrun), 1 thread each": (
            ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m", "ditserve.demo"], 1),
    }
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, (mode, (launch, threads)) in enumerate(modes.items()):
            run = Path(scratch) / str(index)
            command = [sys.executable, *launch, *training, "--run-dir", str(run / "run"), "--output", str(run / "out")]
            subprocess.run(command, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            rows.append({"mode": mode, "seconds_per_step": round(seconds_per_step(run / "run" / "log.jsonl", first, last), 3)})
            print(rows[-1], flush=True)
    single = rows[0]["seconds_per_step"]
    for row in rows:
        row["speed_up"] = round(single / row["seconds_per_step"], 2)
    report = {"model": "ditserve-shapes-edit", "batch": args.batch, "steps_timed": [first, last],
              "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
              "torch": torch.__version__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_parallel_training.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Edit demo training: seconds per step (batch {args.batch}, steps {first}-{last})", "",
             "| launch | s / step | speed-up |", "| --- | --- | --- |"]
    lines += [f"| {r['mode']} | {r['seconds_per_step']:.3f} | {r['speed_up']:.2f}x |" for r in rows]
    (args.out / "data_parallel_training.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
