"""The serving benchmark's own logic: seeded traces, the simulated ideal of each mode, the report."""

from __future__ import annotations

import json
from pathlib import Path

from ditserve.bench.serve import (
    Arrival,
    Costs,
    Shape,
    compare,
    modes,
    percentile,
    poisson_trace,
    simulate_ideal,
    write_serve_results,
)

SHORT, LONG = Shape(10, False), Shape(30, True)


def synthetic_costs(max_batch_size: int) -> Costs:
    """A step of k requests (g of them guided) costs 10 ms per request and 10 ms per guided one."""
    costs = Costs(encode_s=0.001, decode_s=0.002)
    for size in range(1, max_batch_size + 1):
        for guided in range(size + 1):
            costs.step_s[(size, guided)] = 0.01 * size + 0.01 * guided
    for shape in (SHORT, LONG):
        costs.solo_s[shape] = 0.003 + shape.steps * costs.step_s[(1, int(shape.guided))]
    return costs


def test_a_trace_is_reproducible_from_its_seed() -> None:
    first, again = poisson_trace(2.0, 50, [SHORT, LONG], seed=7), poisson_trace(2.0, 50, [SHORT, LONG], seed=7)
    assert first == again
    assert poisson_trace(2.0, 50, [SHORT, LONG], seed=8) != first
    assert all(b.at_s > a.at_s for a, b in zip(first, first[1:], strict=False))
    assert percentile([5, 1, 4, 2, 3], 50) == 3 and percentile([5, 1, 4, 2, 3], 100) == 5


def test_the_simulated_step_scheduler_lets_a_short_request_finish_first() -> None:
    costs = synthetic_costs(2)
    trace = [Arrival(0.0, LONG, "long", 0), Arrival(0.05, SHORT, "short", 1)]
    by_mode = {mode.name: simulate_ideal(trace, mode, costs) for mode in modes(2)}
    long_alone = costs.encode_s + costs.decode_s + 30 * costs.step_s[(1, 1)]
    # one at a time and request scheduling: the short request waits for the long one's whole run
    for name in ("one at a time", "request scheduling"):
        assert abs(by_mode[name][0] - long_alone) < 1e-9
        assert by_mode[name][1] > long_alone - 0.05
    # step scheduling: it joins at the next step and leaves after its own ten
    step_long, step_short = by_mode["step scheduling"]
    assert step_short < 10 * costs.step_s[(2, 1)] + 0.1
    assert step_long > long_alone


def test_a_short_request_preempts_when_the_slot_is_taken() -> None:
    costs = synthetic_costs(1)
    trace = [Arrival(0.0, LONG, "long", 0), Arrival(0.05, SHORT, "short", 1)]
    step_long, step_short = simulate_ideal(trace, modes(1)[0], costs)
    assert step_short < 11 * costs.step_s[(1, 0)] + 0.05  # it ran alone, at once
    assert step_long > step_short


def test_the_report_compares_step_with_request_scheduling(tmp_path: Path) -> None:
    runs = []
    for mode, short_p90, p90 in (("step scheduling", 1.0, 4.0), ("request scheduling", 2.5, 4.2),
                                 ("one at a time", 3.0, 5.0)):
        runs.append({"mode": mode, "rate_fraction": 0.8, "rate_rps": 1.0, "completed": 10, "failed": 0,
                     "throughput_rps": 0.9, "p50_s": 1.0, "p90_s": p90, "p99_s": p90 + 1, "slo_attainment": 0.9,
                     "p90_by_shape_s": {SHORT.label: short_p90, LONG.label: p90}, "ideal_p90_s": 3.0,
                     "p90_vs_ideal": p90 / 3.0, "load_average_1m": 1.0})
    (line,) = compare(runs, [10, 30])
    assert line["short_p90_ratio"] == 1.0 / 2.5 and line["overall_p90_ratio"] == 4.0 / 4.2
    results = {"runs": runs, "comparison": [line], "shapes": [SHORT.label, LONG.label], "slo_factor": 3.0,
               "capacity_one_at_a_time_rps": 1.2, "costs": {"step_s": {"1 requests, 0 guided": 0.02}}}
    paths = write_serve_results(results, tmp_path, "ditserve bench serve --out x")
    assert json.loads(paths["json"].read_text())["command"] == "ditserve bench serve --out x"
    markdown = paths["markdown"].read_text()
    assert "| 0.80x | 0.40 | 0.95 | 1.00 | 1.33 |" in markdown
    assert paths["plot"].stat().st_size > 0
