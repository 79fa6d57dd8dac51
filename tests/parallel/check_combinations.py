"""By-hand check of combined methods on 4 gloo ranks (not collected by pytest: 4 processes on this 2-core machine
cost more than the suite's budget). Prints each combination's final-latent difference to one process:

    OMP_NUM_THREADS=1 .venv/bin/python tests/parallel/check_combinations.py [flux qwen_image wan]
"""

from __future__ import annotations

import sys

from parity_harness import Case, run_parity_group, single_process_run
from test_parallel import PARAMS, PROMPT

from ditserve.testing import tiny_pipeline_dir

COMBINATIONS = {
    "tp2 x cfg2": {"tensor_parallel_size": 2, "cfg_parallel_size": 2},
    "tp2 x ulysses2": {"tensor_parallel_size": 2, "ulysses_degree": 2},
    "tp2 x ring2": {"tensor_parallel_size": 2, "ring_degree": 2},
    "ulysses2 x ring2": {"ulysses_degree": 2, "ring_degree": 2},
    "cfg2 x ulysses2": {"cfg_parallel_size": 2, "ulysses_degree": 2},
}
#: the tiny Wan has 2 heads: Ulysses 2 after TP 2 has 1 head to split (refused at start-up)
NOT_APPLICABLE = {("wan", "tp2 x ulysses2")}


def main() -> None:
    families = sys.argv[1:] or sorted(PARAMS)
    cases = [Case(f"{family}: {name}", tiny_pipeline_dir(family), degrees, PROMPT, PARAMS[family])
             for family in families for name, degrees in COMBINATIONS.items()
             if (family, name) not in NOT_APPLICABLE]
    results, exit_code = run_parity_group(cases, world_size=4)
    print(f"workers' exit code: {exit_code}")
    for family in families:
        expected = single_process_run(Case(family, tiny_pipeline_dir(family), {}, PROMPT, PARAMS[family])).latents
        for case in (c for c in cases if c.name.startswith(f"{family}:")):
            actual = results[case.name].latents
            difference = ((actual - expected).abs().max() / expected.abs().max()).item()
            print(f"{case.name:28s} max relative difference {difference:.2e}")


if __name__ == "__main__":
    main()
