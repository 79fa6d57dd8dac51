"""``ditserve bench serve``: the server under open-loop load, for three ways of batching, in one run.

For each mode (one request at a time, request scheduling, step scheduling) a server is started on loopback over
the same model and driven with the same seeded Poisson arrival trace at several rates (fractions of the
one-at-a-time capacity), with a mix of request shapes (step counts, guidance on and off). Reported per mode and
rate: throughput, p50 / p90 / p99 latency overall and per shape, and SLO attainment (latency within
``SLO_FACTOR`` x the shape's solo time).

The *ideal* of each mode is simulated from measured costs: the same scheduler class, driven by a virtual clock
through the same trace, with each step costing what a step of that many requests (and guided ones) cost when
measured in this process, and each admission and decode what they cost alone. Our p90 is reported against it:
what is left is the engine's and server's own overhead.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ditserve.config import OmniDiffusionConfig, OmniDiffusionSamplingParams
from ditserve.engine.engine import DiffusionEngine
from ditserve.engine.scheduler import SchedulingMode, StepPlan, StepScheduler
from ditserve.request import Request

#: a request meets its SLO when its latency is within this multiple of its shape's solo latency
SLO_FACTOR = 3.0
#: steps of the runs that time a step (the first encodes, the last decodes: the ones between are timed)
COST_STEPS = 6
DEFAULT_RATES = (0.5, 0.8)
PROMPTS = ("a large red circle in the center", "a small blue square at the top left",
           "a green triangle on the right and a yellow circle on the left", "a small purple square at the bottom")


@dataclass(frozen=True)
class Shape:
    """One kind of request of the mix."""

    steps: int
    guided: bool

    @property
    def label(self) -> str:
        return f"{self.steps} steps, {'CFG' if self.guided else 'no CFG'}"

    def fields(self) -> dict[str, Any]:
        """The request's sampling fields over HTTP: true CFG (the demo model's default guidance) or none."""
        guidance = {"true_cfg_scale": 3.0, "negative_prompt": ""} if self.guided else {"true_cfg_scale": 1.0}
        return {"num_inference_steps": self.steps, **guidance}


@dataclass(frozen=True)
class Mode:
    name: str
    scheduling: SchedulingMode
    max_batch_size: int


@dataclass(frozen=True)
class Arrival:
    at_s: float
    shape: Shape
    prompt: str
    seed: int


@dataclass
class Costs:
    """Measured in this process, before the load runs: what the simulation of the ideal charges."""

    #: (requests in the step, of which guided) -> seconds of one denoising step
    step_s: dict[tuple[int, int], float] = field(default_factory=dict)
    encode_s: float = 0.0
    decode_s: float = 0.0
    #: the shape's latency alone on an idle server (HTTP included)
    solo_s: dict[Shape, float] = field(default_factory=dict)


def poisson_trace(rate: float, count: int, shapes: Sequence[Shape], seed: int) -> list[Arrival]:
    """``count`` arrivals at ``rate`` per second, shapes drawn uniformly, all from one seeded generator."""
    rng = random.Random(seed)
    at, trace = 0.0, []
    for index in range(count):
        at += rng.expovariate(rate)
        trace.append(Arrival(at, rng.choice(list(shapes)), PROMPTS[index % len(PROMPTS)], seed * 1000 + index))
    return trace


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: a figure is one request's latency)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# ---------------------------------------------------------------------------------------------- measuring
def _engine(model: str | None, mode: Mode, device: str) -> DiffusionEngine:
    return DiffusionEngine(OmniDiffusionConfig(model=model, device=device, max_batch_size=mode.max_batch_size,
                                               scheduling=mode.scheduling.value))


def measure_step_costs(engine: DiffusionEngine, max_batch_size: int, height: int) -> Costs:
    """Median seconds of a denoising step for every (batch size, guided count) the mix can make, timed on the
    engine's runner directly (the engine is idle), without the steps that also encode or decode."""
    costs = Costs()
    encode, decode = [], []
    for size in range(1, max_batch_size + 1):
        for guided in range(size + 1):
            requests = [_request(engine, Shape(COST_STEPS, index < guided), PROMPTS[index % len(PROMPTS)], index,
                                 height) for index in range(size)]
            outcome = engine.runner.step(StepPlan(admit=requests))
            seconds = []
            while not outcome.finished:
                start = time.perf_counter()
                outcome = engine.runner.step(StepPlan())
                seconds.append(time.perf_counter() - start)
            costs.step_s[(size, guided)] = statistics.median(seconds[:-1])
            encode += [o.timings["encode_s"] for o in outcome.finished]
            decode += [o.timings["decode_s"] for o in outcome.finished]
    costs.encode_s, costs.decode_s = statistics.median(encode), statistics.median(decode)
    return costs


def _request(engine: DiffusionEngine, shape: Shape, prompt: str, seed: int, height: int) -> Request:
    params = OmniDiffusionSamplingParams(seed=seed, height=height, width=height, **shape.fields())
    return engine.make_request(prompt, params)


async def _send(client: Any, url: str, arrival: Arrival, size: str, start: float) -> tuple[Arrival, float, bool]:
    await asyncio.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
    sent = time.perf_counter()
    body = {"prompt": arrival.prompt, "size": size, "seed": arrival.seed, "response_format": "b64_json",
            **arrival.shape.fields()}
    response = await client.post(f"{url}/v1/images/generations", json=body)
    return arrival, time.perf_counter() - sent, response.status_code == 200


async def drive(url: str, trace: Sequence[Arrival], size: str, timeout_s: float) -> list[tuple[Arrival, float, bool]]:
    """Open loop: every request is sent at its arrival time, whatever the server is doing."""
    import httpx

    async with httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=len(trace) + 1)) as client:
        start = time.perf_counter()
        return list(await asyncio.gather(*(_send(client, url, a, size, start) for a in trace)))


def simulate_ideal(trace: Sequence[Arrival], mode: Mode, costs: Costs) -> list[float]:
    """Latency of each request of ``trace`` under ``mode``'s scheduler with no overhead but the measured costs."""
    clock = [0.0]
    scheduler = StepScheduler(_step_key, _cohort_key, mode.max_batch_size, mode=mode.scheduling,
                              clock=lambda: clock[0])
    by_id: dict[str, tuple[int, Request]] = {}
    remaining: dict[str, int] = {}
    latencies: list[float | None] = [None] * len(trace)
    pending = list(enumerate(trace))
    while pending or remaining or len(scheduler):
        while pending and pending[0][1].at_s <= clock[0]:
            index, arrival = pending.pop(0)
            request = Request(prompt=arrival.prompt, params=OmniDiffusionSamplingParams(**arrival.shape.fields()),
                              arrival_time=arrival.at_s)
            by_id[request.request_id] = (index, request)
            scheduler.add(request)
        plan = scheduler.schedule(0)
        if plan is None:
            clock[0] = pending[0][1].at_s
            continue
        for request in plan.admit:
            remaining[request.request_id] = request.params.num_inference_steps
            clock[0] += costs.encode_s
        running = [rid for rid in (plan.run if plan.run is not None else remaining) if rid in remaining]
        guided = sum(by_id[rid][1].params.true_cfg_scale > 1 for rid in running)
        clock[0] += costs.step_s[(len(running), guided)]
        finished = []
        for rid in running:
            remaining[rid] -= 1
            if remaining[rid] == 0:
                clock[0] += costs.decode_s
                index, request = by_id[rid]
                latencies[index] = clock[0] - request.arrival_time
                finished.append(rid)
        scheduler.advance({rid: (by_id[rid][1].params.num_inference_steps - remaining[rid],
                                 by_id[rid][1].params.num_inference_steps) for rid in running})
        for rid in finished:
            del remaining[rid]
        scheduler.finish(finished)
    return [latency for latency in latencies if latency is not None]


def _step_key(request: Request) -> tuple[Any, ...]:
    return ()


def _cohort_key(request: Request) -> tuple[Any, ...]:
    return request.params.num_inference_steps, request.params.true_cfg_scale


def summarize(latencies: Sequence[float], shapes: Sequence[Shape], costs: Costs, duration_s: float,
              ok: Sequence[bool]) -> dict[str, Any]:
    by_shape: dict[str, list[float]] = {}
    for latency, shape in zip(latencies, shapes, strict=True):
        by_shape.setdefault(shape.label, []).append(latency)
    met = sum(latency <= SLO_FACTOR * costs.solo_s[shape] for latency, shape in zip(latencies, shapes, strict=True))
    return {"completed": sum(ok), "failed": len(ok) - sum(ok), "throughput_rps": sum(ok) / duration_s,
            "p50_s": percentile(latencies, 50), "p90_s": percentile(latencies, 90),
            "p99_s": percentile(latencies, 99), "slo_attainment": met / len(latencies),
            "p90_by_shape_s": {label: percentile(values, 90) for label, values in sorted(by_shape.items())}}


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class ServeBenchOptions:
    model: str | None = None
    device: str = "auto"
    height: int = 128
    requests: int = 40
    rates: tuple[float, ...] = DEFAULT_RATES
    steps: tuple[int, ...] = (10, 30)
    max_batch_size: int = 4
    seed: int = 0
    timeout_s: float = 600.0


def modes(max_batch_size: int) -> list[Mode]:
    """Step scheduling first: the costs are measured on its engine (it batches up to ``max_batch_size``)."""
    return [Mode("step scheduling", SchedulingMode.STEP, max_batch_size),
            Mode("request scheduling", SchedulingMode.REQUEST, max_batch_size),
            Mode("one at a time", SchedulingMode.REQUEST, 1)]


def run_serve_bench(options: ServeBenchOptions) -> dict[str, Any]:
    from ditserve.entrypoints.server.app import ServerSettings, create_app
    from ditserve.entrypoints.server.thread import ServerThread

    shapes = [Shape(steps, guided) for steps in options.steps for guided in (False, True)]
    size = f"{options.height}x{options.height}"
    results: dict[str, Any] = {"options": {**asdict(options), "rates": list(options.rates)},
                               "shapes": [s.label for s in shapes], "slo_factor": SLO_FACTOR, "runs": []}
    costs: Costs | None = None
    capacity_rps = None
    with tempfile.TemporaryDirectory() as output_dir:
        for mode in modes(options.max_batch_size):
            engine = _engine(options.model, mode, options.device)
            try:
                if costs is None:
                    costs = measure_step_costs(engine, options.max_batch_size, options.height)
                settings = ServerSettings(served_model_name="bench", output_dir=Path(output_dir))
                with ServerThread(create_app(engine, settings)) as server:
                    if capacity_rps is None:
                        for shape in shapes:  # warm-up, then the solo latency of each shape
                            asyncio.run(drive(server.url, [Arrival(0.0, shape, PROMPTS[0], 0)], size,
                                              options.timeout_s))
                            solo = asyncio.run(drive(server.url, [Arrival(0.0, shape, PROMPTS[1], 1)], size,
                                                     options.timeout_s))
                            costs.solo_s[shape] = solo[0][1]
                        capacity_rps = 1 / statistics.mean(costs.solo_s.values())
                        results["capacity_one_at_a_time_rps"] = capacity_rps
                    for fraction in options.rates:
                        trace = poisson_trace(fraction * capacity_rps, options.requests, shapes, options.seed)
                        start = time.perf_counter()
                        done = asyncio.run(drive(server.url, trace, size, options.timeout_s))
                        duration = time.perf_counter() - start
                        latencies = [latency for _, latency, _ in done]
                        record = {"mode": mode.name, "rate_fraction": fraction,
                                  "rate_rps": fraction * capacity_rps,
                                  # other work on the machine skews latencies: say how busy it was
                                  "load_average_1m": os.getloadavg()[0],
                                  **summarize(latencies, [a.shape for a, _, _ in done], costs, duration,
                                              [ok for _, _, ok in done])}
                        ideal = simulate_ideal(trace, mode, costs)
                        record["ideal_p90_s"] = percentile(ideal, 90)
                        record["p90_vs_ideal"] = record["p90_s"] / record["ideal_p90_s"]
                        results["runs"].append(record)
                        print(f"[serve bench] {mode.name} at {fraction:.2f}x: p90 {record['p90_s']:.2f} s "
                              f"(ideal {record['ideal_p90_s']:.2f} s), {record['throughput_rps']:.3f} req/s")
            finally:
                engine.close()
    assert costs is not None
    results["costs"] = {"step_s": {f"{k[0]} requests, {k[1]} guided": v for k, v in sorted(costs.step_s.items())},
                        "encode_s": costs.encode_s, "decode_s": costs.decode_s,
                        "solo_s": {s.label: v for s, v in costs.solo_s.items()}}
    results["comparison"] = compare(results["runs"], options.steps)
    return results


def compare(runs: Sequence[dict[str, Any]], steps: Sequence[int]) -> list[dict[str, Any]]:
    """Per rate: step scheduling against request scheduling (short requests' p90, overall p90, throughput)."""
    short = min(steps)
    lines = []
    for fraction in sorted({r["rate_fraction"] for r in runs}):
        at_rate = {r["mode"]: r for r in runs if r["rate_fraction"] == fraction}
        step, request = at_rate.get("step scheduling"), at_rate.get("request scheduling")
        if step is None or request is None:
            continue

        def short_p90(run: dict[str, Any]) -> float:
            return max(v for k, v in run["p90_by_shape_s"].items() if k.startswith(f"{short} steps"))

        lines.append({"rate_fraction": fraction,
                      "short_p90_ratio": short_p90(step) / short_p90(request),
                      "overall_p90_ratio": step["p90_s"] / request["p90_s"],
                      "throughput_ratio": step["throughput_rps"] / request["throughput_rps"],
                      "step_p90_vs_ideal": step["p90_vs_ideal"]})
    return lines


def write_serve_results(results: dict[str, Any], out: Path, command: str) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    results = {**results, "command": command}
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "latency.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(markdown(results))
    plot(results, paths["plot"])
    return paths


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Serving benchmark", "", f"`{results['command']}`", "",
             f"One-at-a-time capacity: {results['capacity_one_at_a_time_rps']:.3f} req/s (mean solo latency of "
             f"the mix: {', '.join(results['shapes'])}). SLO: latency <= {results['slo_factor']:.0f}x the "
             "shape's solo latency. The ideal is the same scheduler simulated with the measured step costs.", "",
             "| mode | rate | req/s | p50 s | p90 s | p99 s | ideal p90 s | p90 / ideal | SLO met | load | p90 by shape |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["runs"]:
        shapes = "; ".join(f"{k}: {v:.1f}" for k, v in r["p90_by_shape_s"].items())
        lines.append(f"| {r['mode']} | {r['rate_fraction']:.2f}x | {r['throughput_rps']:.3f} | {r['p50_s']:.1f} | "
                     f"{r['p90_s']:.1f} | {r['p99_s']:.1f} | {r['ideal_p90_s']:.1f} | {r['p90_vs_ideal']:.2f} | "
                     f"{r['slo_attainment']:.0%} | {r['load_average_1m']:.1f} | {shapes} |")
    lines += ["", "| rate | short p90, step / request | overall p90, step / request | throughput, step / request "
              "| step p90 / ideal |", "|---|---|---|---|---|"]
    for c in results["comparison"]:
        lines.append(f"| {c['rate_fraction']:.2f}x | {c['short_p90_ratio']:.2f} | {c['overall_p90_ratio']:.2f} | "
                     f"{c['throughput_ratio']:.2f} | {c['step_p90_vs_ideal']:.2f} |")
    lines += ["", "Measured step costs (s): " + ", ".join(f"{k}: {v:.3f}" for k, v in results["costs"]["step_s"].items()),
              ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(r["mode"] for r in results["runs"]):
        runs = [r for r in results["runs"] if r["mode"] == mode]
        axis.plot([r["throughput_rps"] for r in runs], [r["p90_s"] for r in runs], marker="o", label=mode)
    axis.set_xlabel("throughput (requests / s)")
    axis.set_ylabel("p90 latency (s)")
    axis.set_title("open-loop Poisson load")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
