"""The records of ``ditserve bench scale`` and its outputs: ``scale.json`` for machines, ``scale.md`` for people.

Both files are rewritten after every row (each through a temporary file and a rename), so a run cut off by the
device's time limit still leaves every figure measured before the cut, the plan, and why the rest is missing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

JSON_NAME = "scale.json"
MARKDOWN_NAME = "scale.md"
#: the schema of ``scale.json``; bump when a field changes meaning
SCHEMA = "ditserve.bench.scale/1"
#: the models ``scale_models.MODELS`` builds, by name (here so the command line can list them without torch)
MODEL_NAMES = ("qwen-image", "flux1-dev", "wan2.2-ti2v-5b")
#: the whole-request figure is derived for this many steps (the seed documents' Qwen-Image baseline)
DERIVED_STEPS = 50


class Row(str, Enum):
    """What a row measures. Transformer rows time one denoising step; VAE rows one decode."""

    DIFFUSERS = "diffusers"
    OURS = "ours"
    CACHE_NEVER_SKIP = "cache_never_skip"
    COMPILE = "compile"
    FP8 = "fp8"
    COMPILE_FP8 = "compile_fp8"
    LAYERWISE_OFFLOAD = "layerwise_offload"
    MODEL_OFFLOAD = "model_offload"
    VAE_DECODE = "vae_decode"
    VAE_DECODE_TILED = "vae_decode_tiled"

    @property
    def is_vae(self) -> bool:
        return self in (Row.VAE_DECODE, Row.VAE_DECODE_TILED)


ROW_DESCRIPTIONS = {
    Row.DIFFUSERS: "diffusers' transformer called directly on the same inputs, then the scheduler step (the body "
                   "of diffusers' denoising loop without its per-step Python: a lower bound of its step)",
    Row.OURS: "our step: ModelRunner.step through the family adapter's predict (StepBatch, call_transformer, "
              "forward context, scheduler step), bf16, eager",
    Row.CACHE_NEVER_SKIP: "ours with TeaCache at rel_l1_thresh=0 (it computes every step): the cache's bookkeeping",
    Row.COMPILE: "ours with regional compile (enforce_eager=False); first call includes the compile",
    Row.FP8: "ours with FP8 linears (quantization='fp8', ignored_layers = the family's list in scale_models.py)",
    Row.COMPILE_FP8: "ours with FP8 and regional compile",
    Row.LAYERWISE_OFFLOAD: "ours with layerwise offload (blocks streamed from pinned CPU memory one ahead of use)",
    Row.MODEL_OFFLOAD: "ours with model-level offload; step with the transformer resident, first call includes "
                       "moving it onto the GPU (paid once per request)",
    Row.VAE_DECODE: "VAE decode of random latents at the output size",
    Row.VAE_DECODE_TILED: "VAE decode with tiling (vae_use_tiling)",
}


#: what every reader of the figures must know, in both outputs
CAVEATS = (
    "random bf16 weights of the published architectures: the timings and memory are real; output differences "
    "(rel_error_vs_bf16, FP8) say nothing about image quality",
    f"derived_request_s is computed from the step time ({DERIVED_STEPS} x step), not measured; text encoding is "
    "not included (random prompt embeddings in place of the text encoders)",
    "one transformer pass per step (no classifier-free guidance); derived_request_default_cfg_s counts the "
    "family's default passes",
)


class Status(str, Enum):
    OK = "ok"
    #: not run: outside the budget, or not a default row here
    SKIPPED = "skipped"
    #: cannot run here (a lever refused the device: FP8 or offload on a CPU)
    UNAVAILABLE = "unavailable"
    #: raised while running (out of memory, a bug): the error is the reason
    FAILED = "failed"


@dataclass
class PlannedRow:
    order: int
    model: str
    row: Row
    #: the planner's estimate of this row's cost in seconds (build, set-up, warm-up and timed repeats)
    expected_s: float


@dataclass
class RowResult:
    model: str
    row: Row
    status: Status
    reason: str | None = None
    expected_s: float | None = None
    #: wall time the row took in all (build, set-up, warm-up, repeats)
    elapsed_s: float | None = None
    #: median of the timed repeats: one step (transformer rows) or one decode (VAE rows), CUDA events on a GPU
    median_ms: float | None = None
    samples_ms: list[float] = field(default_factory=list)
    #: the first warm-up call: compile, weight transfer or request admission included
    first_call_s: float | None = None
    #: peak during the timed repeats, resident weights included (torch.cuda.max_memory_allocated on a GPU)
    peak_memory_mib: float | None = None
    memory_kind: str | None = None
    #: ||out - out_bf16|| / ||out_bf16|| of the first transformer call against the same model in eager bf16
    #: on the same input; random weights: says nothing about image quality
    rel_error_vs_bf16: float | None = None
    #: cache rows: steps the cache skipped (must be 0 for a never-skip setting)
    skipped_steps: int | None = None
    #: levers the engine reported as applied
    levers: list[str] = field(default_factory=list)
    # filled from the other rows of the same model (see ``add_ratios``)
    time_vs_ours: float | None = None
    time_vs_diffusers: float | None = None
    peak_memory_vs_ours: float | None = None
    #: derived, not measured: DERIVED_STEPS x the step time (model offload adds its per-request transfer)
    derived_request_s: float | None = None
    #: the same with the family's default guidance (two transformer passes per step for Qwen-Image and Wan)
    derived_request_default_cfg_s: float | None = None


@dataclass
class TargetCheck:
    model: str
    target: str
    limit: float
    value: float | None
    #: None while a row it needs is missing
    met: bool | None


@dataclass
class ScaleResults:
    command: str
    scale: str
    device: str
    dtype: str
    torch_version: str
    diffusers_version: str
    warmup: int
    repeats: int
    budget_s: float | None
    started: str
    models: dict[str, dict[str, Any]]
    plan: list[PlannedRow]
    rows: list[RowResult] = field(default_factory=list)
    targets: list[TargetCheck] = field(default_factory=list)
    elapsed_s: float = 0.0
    #: False until every planned row has a record: a file read after a cut-off says so
    complete: bool = False
    notes: tuple[str, ...] = ()
    schema: str = SCHEMA


def _ok(rows: Sequence[RowResult], model: str, row: Row) -> RowResult | None:
    return next((r for r in rows if r.model == model and r.row is row and r.status is Status.OK), None)


def _ratio(value: float | None, reference: float | None) -> float | None:
    return None if value is None or not reference else value / reference


def add_ratios(results: ScaleResults, cfg_passes: dict[str, int]) -> None:
    """Each row against ours and diffusers of the same model (same process, warm), and the derived figures."""
    for record in results.rows:
        if record.status is not Status.OK:
            continue
        ours, diffusers = _ok(results.rows, record.model, Row.OURS), _ok(results.rows, record.model, Row.DIFFUSERS)
        if record.row.is_vae:
            continue
        record.time_vs_ours = _ratio(record.median_ms, ours and ours.median_ms)
        record.time_vs_diffusers = _ratio(record.median_ms, diffusers and diffusers.median_ms)
        record.peak_memory_vs_ours = _ratio(record.peak_memory_mib, ours and ours.peak_memory_mib)
        step_s = record.median_ms / 1000
        per_request_s = 0.0
        if record.row is Row.MODEL_OFFLOAD and record.first_call_s is not None:
            # the transformer moves onto the GPU once per request (the other components take its place between)
            per_request_s = max(record.first_call_s - step_s, 0.0)
        record.derived_request_s = DERIVED_STEPS * step_s + per_request_s
        record.derived_request_default_cfg_s = DERIVED_STEPS * step_s * cfg_passes[record.model] + per_request_s


class Measure(str, Enum):
    TIME = "time"
    MEMORY = "memory"


@dataclass(frozen=True)
class Target:
    """One of issue 21's targets: ``row``'s measure over ``reference``'s, at most ``limit``."""

    description: str
    row: Row
    reference: Row
    measure: Measure
    limit: float
    #: the models it applies to (None: every model)
    models: tuple[str, ...] | None = None


QWEN_IMAGE_NAME, FLUX1_DEV_NAME, WAN22_TI2V_5B_NAME = MODEL_NAMES
TARGETS = (
    Target("our step time / diffusers' <= 1.0", Row.OURS, Row.DIFFUSERS, Measure.TIME, 1.0),
    Target("compile + FP8 step time / our eager bf16 <= 0.7", Row.COMPILE_FP8, Row.OURS, Measure.TIME, 0.7,
           (QWEN_IMAGE_NAME, FLUX1_DEV_NAME)),
    Target("layerwise offload peak memory / resident <= 0.35", Row.LAYERWISE_OFFLOAD, Row.OURS, Measure.MEMORY,
           0.35, (WAN22_TI2V_5B_NAME,)),
    Target("layerwise offload step time / resident <= 1.3", Row.LAYERWISE_OFFLOAD, Row.OURS, Measure.TIME, 1.3,
           (WAN22_TI2V_5B_NAME,)),
    Target("cache set never to skip: step time / ours <= 1.02", Row.CACHE_NEVER_SKIP, Row.OURS, Measure.TIME, 1.02),
)


def _measured(record: RowResult, measure: Measure) -> float | None:
    return record.median_ms if measure is Measure.TIME else record.peak_memory_mib


def evaluate_targets(results: ScaleResults) -> list[TargetCheck]:
    checks = []
    for model in results.models:
        for target in TARGETS:
            if target.models is not None and model not in target.models:
                continue
            a, b = _ok(results.rows, model, target.row), _ok(results.rows, model, target.reference)
            value = None if a is None or b is None else _ratio(_measured(a, target.measure),
                                                               _measured(b, target.measure))
            checks.append(TargetCheck(model, target.description, target.limit, value,
                                      None if value is None else value <= target.limit))
    return checks


def _fmt(value: float | None, pattern: str = "{:.2f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return pattern.format(value)


def _count(parameters: int) -> str:
    return f"{parameters / 1e9:.2f} B" if parameters >= 1e9 else f"{parameters / 1e6:.2f} M"


def markdown(results: ScaleResults) -> str:
    tiny = results.scale != "full"
    lines = [f"# ditserve bench scale ({results.scale} scale)", "", "Command:", "", f"    {results.command}", "",
             f"- device {results.device}, {results.dtype}; torch {results.torch_version}, diffusers "
             f"{results.diffusers_version}",
             f"- {results.warmup} warm-up calls, then the median of {results.repeats} timed calls per row; rows in "
             "one process, each model's rows against its own `ours` and `diffusers` rows",
             f"- started {results.started}, {results.elapsed_s:.0f} s so far"
             + (f" of a {results.budget_s:.0f} s budget" if results.budget_s else "")
             + ("" if results.complete else " (INCOMPLETE: the run stopped before its last row)"),
             *(f"- {note}" for note in results.notes)]
    if tiny:
        lines.append("- TINY SCALE (dry run): a check that the code path works, not evidence of anything")
    lines += ["", "## Models", "", "| model | parameters | weights GiB | output | image tokens | text tokens |",
              "|---|---|---|---|---|---|"]
    for name, info in results.models.items():
        lines.append(f"| {name} | {_count(info['parameters'])} | {info['weight_bytes'] / 2**30:.3f} | "
                     f"{info['output']} | {info['image_tokens']} | {info['text_tokens']} |")
    lines += ["", "## Rows", "",
              "| model | row | status | ms (median) | vs ours | vs diffusers | peak MiB | peak vs ours | first call s "
              f"| derived {DERIVED_STEPS} steps s | with default CFG s | rel. error vs bf16 | reason |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results.rows:
        lines.append(
            f"| {r.model} | {r.row.value} | {r.status.value} | {_fmt(r.median_ms, '{:.1f}')} | "
            f"{_fmt(r.time_vs_ours, '{:.3f}')} | {_fmt(r.time_vs_diffusers, '{:.3f}')} | "
            f"{_fmt(r.peak_memory_mib, '{:.0f}')} | {_fmt(r.peak_memory_vs_ours)} | {_fmt(r.first_call_s)} | "
            f"{_fmt(r.derived_request_s, '{:.1f}')} | {_fmt(r.derived_request_default_cfg_s, '{:.1f}')} | "
            f"{_fmt(r.rel_error_vs_bf16, '{:.2e}')} | {r.reason or ''} |")
    lines += ["", "## Targets (issue 21)" + (" (tiny scale: not evidence)" if tiny else ""), "",
              "| model | target | value | met |", "|---|---|---|---|"]
    for check in results.targets:
        met = "not measured" if check.met is None else ("yes" if check.met else "NO")
        lines.append(f"| {check.model} | {check.target} | {_fmt(check.value, '{:.3f}')} | {met} |")
    lines += ["", "## Plan", "", "Cheapest first; each row runs only if its expected cost fits the budget left.", "",
              "| # | model | row | expected s | what it measures |", "|---|---|---|---|---|"]
    for planned in results.plan:
        lines.append(f"| {planned.order} | {planned.model} | {planned.row.value} | {planned.expected_s:.1f} | "
                     f"{ROW_DESCRIPTIONS[planned.row]} |")
    return "\n".join(lines) + "\n"


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_results(results: ScaleResults, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / JSON_NAME, "markdown": out_dir / MARKDOWN_NAME}
    _write_atomically(paths["json"], json.dumps(asdict(results), indent=1, default=_json_value) + "\n")
    _write_atomically(paths["markdown"], markdown(results))
    return paths


def _json_value(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
