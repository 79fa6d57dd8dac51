"""``ditserve bench``: speed against quality for our cache backends and the peers, on one model, in one run.

    from ditserve.bench import BenchOptions, run_bench, write_outputs
    results = run_bench(BenchOptions(model=None, steps=50, num_prompts=4, repeats=2))
    write_outputs(results, Path("bench-out"))
"""

from ditserve.bench.report import write_outputs
from ditserve.bench.runner import BenchOptions, run_bench

__all__ = ["BenchOptions", "run_bench", "write_outputs"]
