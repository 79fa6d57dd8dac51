"""``python -m ditserve.bench.scale`` (also ``ditserve bench scale``): evidence at real scale.

Transformers of the published architectures of Qwen-Image, FLUX.1-dev and Wan2.2-TI2V-5B (``scale_models``),
random bf16 weights drawn on the GPU, one denoising step at the published output size timed in one process:
diffusers' own transformer call against our step loop, then our loop with each lever (regional compile, FP8,
both, layerwise and model-level offload), a cache set never to skip, and the VAE decode with and without tiling.

GPU time comes in short windows, so ``--budget-s`` plans the rows cheapest first with each row's expected cost,
runs a row only when it fits the time left, and records the others with the reason; the outputs are rewritten
after every row. ``--dry-run`` runs the same code at a tiny scale (a few narrow blocks, 64x64) in seconds on a
CPU, which is what the tests run.

    python -m ditserve.bench.scale --budget-s 270 --out results/scale        # on a GPU
    python -m ditserve.bench.scale --dry-run --out /tmp/scale                # anywhere, seconds
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ditserve.bench.overhead import NEVER_SKIP
from ditserve.bench.scale_models import (
    MODELS,
    OutputSize,
    Scale,
    ScaleModel,
    Workload,
    build_pipeline,
    vae_latent_shape,
    workload,
)
from ditserve.bench.scale_report import (
    CAVEATS,
    DERIVED_STEPS,
    PlannedRow,
    Row,
    RowResult,
    ScaleResults,
    Status,
    add_ratios,
    evaluate_targets,
    write_results,
)
from ditserve.config import OmniDiffusionConfig, OmniDiffusionSamplingParams
from ditserve.engine.runner import ModelRunner
from ditserve.engine.scheduler import StepPlan
from ditserve.errors import DitServeError, InvalidParameterError
from ditserve.levers import apply_levers
from ditserve.levers.measure import peak_memory_bytes, reset_peak_memory
from ditserve.models.base import RequestState
from ditserve.models.loader import LoadedModel, resolve_device
from ditserve.request import Request

logger = logging.getLogger(__name__)

#: the cache backend of the never-skip row: ours, with no library behind it, and on every family
NEVER_SKIP_BACKEND = "tea_cache"
#: the seed of every weight, embedding and noise tensor: rows of one model see the same model and input
SEED = 0
#: decodes timed per VAE row after one warm-up (a video decode takes seconds at full size)
VAE_REPEATS = 2
#: seconds kept free at the end of the budget for writing the outputs
BUDGET_RESERVE_S = 5.0
#: tiled decoding re-computes the tiles' overlaps: its expected cost relative to a whole decode
TILED_VAE_COST_FACTOR = 1.5
#: rows that run at the tiny scale on a CPU only when named with --rows: a compile takes 20-90 s there
#: (ditserve/levers/compile.py), which would make the dry run minutes instead of seconds
CPU_OPT_IN_ROWS = (Row.COMPILE, Row.COMPILE_FP8)


@dataclass(frozen=True)
class CostModel:
    """The planner's guesses of how fast a device does each part of a row (estimates, refined per model by
    the first measured step). GPU figures are for an H100: bf16 matrix products at about 800 TFLOP/s peak,
    of which an eager DiT step keeps about half; weights copied to pinned CPU memory and streamed back over
    PCIe; one Inductor compile per repeated block class (24 s for FLUX's two classes on an H100,
    ditserve/levers/compile.py; the graphs of a full-size block hold the same operations)."""

    flops_per_s: float
    #: Python and launch time per block per step (what dominates tiny models)
    per_block_s: float
    build_fixed_s: float
    build_bytes_per_s: float
    #: weights moved to (pinned) CPU memory when an offload lever is applied
    to_host_bytes_per_s: float
    #: weights streamed back to the device during an offloaded step
    stream_bytes_per_s: float
    compile_s_per_block_class: float
    #: a guess until the first full-size decode is timed (output pixels x frames, in millions)
    vae_s_per_megapixel_frame: float


GPU_COSTS = CostModel(flops_per_s=400e12, per_block_s=0.4e-3, build_fixed_s=5.0, build_bytes_per_s=20e9,
                      to_host_bytes_per_s=3e9, stream_bytes_per_s=20e9, compile_s_per_block_class=20.0,
                      vae_s_per_megapixel_frame=0.15)
#: the tiny models of --dry-run on a small shared CPU (only orders rows there; no budget is meant for it)
CPU_COSTS = CostModel(flops_per_s=5e9, per_block_s=5e-3, build_fixed_s=1.0, build_bytes_per_s=1e9,
                      to_host_bytes_per_s=2e9, stream_bytes_per_s=2e9, compile_s_per_block_class=60.0,
                      vae_s_per_megapixel_frame=20.0)


@dataclass
class ScaleOptions:
    models: Sequence[str] = tuple(MODELS)
    rows: Sequence[Row] | None = None
    budget_s: float | None = None
    warmup: int = 2
    repeats: int = 5
    dry_run: bool = False
    device: str = "auto"
    #: Wan's frame count at full scale (4k+1), for a GPU where 81 frames do not fit
    frames: int | None = None
    out: Path = Path("scale-out")
    command: str = "python -m ditserve.bench.scale"


def lever_config(row: Row, model: ScaleModel, device: torch.device) -> OmniDiffusionConfig:
    """The engine options of a row, applied through the engine's own ``apply_levers`` and ``ModelRunner``."""
    levers: dict[str, Any] = {"enforce_eager": True}
    if row in (Row.COMPILE, Row.COMPILE_FP8):
        levers["enforce_eager"] = False
    if row in (Row.FP8, Row.COMPILE_FP8):
        levers |= {"quantization": "fp8", "ignored_layers": list(model.fp8_ignored_layers)}
    if row is Row.CACHE_NEVER_SKIP:
        levers |= {"cache_backend": NEVER_SKIP_BACKEND, "cache_config": dict(NEVER_SKIP[NEVER_SKIP_BACKEND])}
    levers |= {Row.LAYERWISE_OFFLOAD: {"enable_layerwise_offload": True}, Row.MODEL_OFFLOAD: {"enable_cpu_offload": True},
               Row.VAE_DECODE_TILED: {"vae_use_tiling": True}}.get(row, {})
    return OmniDiffusionConfig(device=str(device), dtype="bfloat16", enable_prompt_embed_cache=False, **levers)


#: rows that change the model in place (quantized, compiled, offloaded): the next row gets a model built anew
MUTATING_ROWS = (Row.COMPILE, Row.FP8, Row.COMPILE_FP8, Row.LAYERWISE_OFFLOAD, Row.MODEL_OFFLOAD)


def estimated_step_s(work: Workload, costs: CostModel) -> float:
    return work.step_flops / costs.flops_per_s + work.attention_layers * costs.per_block_s


def expected_cost_s(row: Row, work: Workload, costs: CostModel, calls: int, block_classes: int,
                    step_factor: float = 1.0) -> float:
    """The planner's estimate of one row's seconds; ``step_factor`` scales the step estimate to the
    measured step once the model's first transformer row ran."""
    build_s = costs.build_fixed_s + work.weight_bytes / costs.build_bytes_per_s
    if row.is_vae:
        decode_s = costs.vae_s_per_megapixel_frame * work.output_megapixel_frames
        factor = TILED_VAE_COST_FACTOR if row is Row.VAE_DECODE_TILED else 1.0
        return costs.build_fixed_s + (1 + VAE_REPEATS) * decode_s * factor
    step_s = step_factor * estimated_step_s(work, costs)
    # the bf16 reference step every row takes first (see ScaleBench._reference), with its request admission
    total = build_s + 2 * step_s
    if row in (Row.COMPILE, Row.COMPILE_FP8):
        total += costs.compile_s_per_block_class * block_classes
    if row in (Row.FP8, Row.COMPILE_FP8):
        total += work.weight_bytes / costs.build_bytes_per_s
    if row is Row.LAYERWISE_OFFLOAD:
        total += work.weight_bytes / costs.to_host_bytes_per_s
        step_s = max(step_s, work.weight_bytes / costs.stream_bytes_per_s)
    if row is Row.MODEL_OFFLOAD:
        total += work.weight_bytes / costs.to_host_bytes_per_s + work.weight_bytes / costs.stream_bytes_per_s
    return total + calls * step_s


def bench_request(loaded: LoadedModel, spec: ScaleModel, scale: Scale) -> Request:
    """The request every row of a model steps: its output size, a DERIVED_STEPS-step schedule, one pass per step."""
    size = spec.output_size(scale)
    asked = {"height": size.height, "width": size.width, "num_inference_steps": DERIVED_STEPS, "seed": SEED,
             "max_sequence_length": spec.tokens_of_text(scale), **spec.params}
    if size.frames > 1:
        asked["num_frames"] = size.frames
    params = loaded.adapter.resolve_params(OmniDiffusionSamplingParams(**asked))
    return Request(prompt="ditserve bench scale", params=params)


@dataclass
class FirstCall:
    """The first transformer call of a runner: its inputs, output, and the request's scheduler at that step."""

    transformer_name: str
    kwargs: dict[str, Any]
    output: torch.Tensor
    sample: torch.Tensor
    timestep: torch.Tensor
    scheduler: Any


class RecordingRunner(ModelRunner):
    """``ModelRunner`` that keeps its first transformer call (inputs for the diffusers row, output for the
    relative error); every call, the first included, goes through the runner's own ``call_transformer``."""

    first_call: FirstCall | None = None

    def call_transformer(self, branch: str, states: Sequence[RequestState], transformer_name: str = "transformer",
                         **kwargs: Any) -> torch.Tensor:
        output = super().call_transformer(branch, states, transformer_name, **kwargs)
        if self.first_call is None:
            state = states[0]
            self.first_call = FirstCall(transformer_name, dict(kwargs), output.detach().float().cpu(),
                                        state.latents, state.t, copy.deepcopy(state.scheduler))
        return output


class LoopStepper:
    """One resident request stepped through the runner, one denoising step per call (the first admits it)."""

    def __init__(self, runner: ModelRunner, request: Request) -> None:
        self.runner, self.request, self.admitted = runner, request, False

    def __call__(self) -> None:
        outcome = self.runner.step(StepPlan() if self.admitted else StepPlan(admit=[self.request]))
        self.admitted = True
        if outcome.failed:
            raise next(iter(outcome.failed.values()))

    def close(self) -> None:
        if self.admitted:
            self.runner.step(StepPlan(drop=[self.request.request_id]))


@dataclass
class Timing:
    first_call_s: float
    samples_ms: list[float]
    peak_memory_bytes: int
    memory_kind: str

    @property
    def median_ms(self) -> float:
        ordered = sorted(self.samples_ms)
        middle = len(ordered) // 2
        return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(call: Callable[[], Any], device: torch.device) -> float:
    """One call's time: CUDA events around it on a GPU (host gaps between launches included), else the clock."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    began = time.perf_counter()
    call()
    return (time.perf_counter() - began) * 1000


def measure(call: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> Timing:
    """Warm-up calls (the first timed on its own: compiles and transfers happen there), then ``repeats`` timed
    calls with the peak memory since the warm-up."""
    began = time.perf_counter()
    call()
    _synchronize(device)
    first_call_s = time.perf_counter() - began
    for _ in range(warmup - 1):
        call()
    reset_peak_memory(device)
    samples = [timed_ms(call, device) for _ in range(repeats)]
    peak, kind = peak_memory_bytes(device)
    return Timing(first_call_s, samples, peak, kind)


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    reference64 = reference.double()
    return float((output.double() - reference64).norm() / reference64.norm().clamp(min=1e-30))


@dataclass
class BuiltModel:
    """A built pipeline, whether it is still as built (no lever applied), and its bf16 reference call."""

    spec: ScaleModel
    loaded: LoadedModel
    pristine: bool = True
    reference: FirstCall | None = None


class ScaleBench:
    """Plans the rows, runs them one by one (one built model at a time), and rewrites the outputs after each."""

    def __init__(self, options: ScaleOptions) -> None:
        self.started = time.perf_counter()
        self.options = options
        self.device = resolve_device(options.device)
        self.scale = Scale.TINY if options.dry_run else Scale.FULL
        if self.scale is Scale.FULL and self.device.type != "cuda":
            raise InvalidParameterError(
                f"full-size models need a CUDA GPU (device is {self.device.type!r}); use --dry-run to run the same "
                "code at a tiny scale on this machine", param="dry_run")
        self.specs = {name: self._spec(name) for name in options.models}
        self.costs = GPU_COSTS if self.device.type == "cuda" else CPU_COSTS
        self.workloads = {name: workload(spec, self.scale) for name, spec in self.specs.items()}
        #: measured step / estimated step per model, once one of its eager rows ran
        self._step_factor: dict[str, float] = {}
        self._built: BuiltModel | None = None
        self.results = self._empty_results()

    def _spec(self, name: str) -> ScaleModel:
        spec = MODELS[name]
        if self.options.frames is None or spec.size.frames == 1:
            return spec
        return dataclasses.replace(spec, size=OutputSize(spec.size.height, spec.size.width, self.options.frames))

    # ------------------------------------------------------------------ plan
    def _expected(self, model: str, row: Row) -> float:
        spec = self.specs[model]
        block_classes = len(getattr(_diffusers_class(spec.transformer_class), "_repeated_blocks", ()) or (1,))
        calls = self.options.warmup + self.options.repeats
        return expected_cost_s(row, self.workloads[model], self.costs, calls, block_classes,
                               self._step_factor.get(model, 1.0))

    def _selected_rows(self) -> list[Row]:
        return list(self.options.rows) if self.options.rows is not None else list(Row)

    def plan(self) -> list[PlannedRow]:
        pairs = [(model, row) for model in self.specs for row in self._selected_rows()]
        # cheapest first: a short window measures as many rows as it can; ties keep model and row order
        ordered = sorted(pairs, key=lambda pair: self._expected(*pair))
        return [PlannedRow(i + 1, model, row, round(self._expected(model, row), 1))
                for i, (model, row) in enumerate(ordered)]

    def _empty_results(self) -> ScaleResults:
        import diffusers

        device_name = (f"cuda ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda"
                       else "cpu")
        models = {}
        for name, spec in self.specs.items():
            work, size = self.workloads[name], spec.output_size(self.scale)
            models[name] = {
                "parameters": work.parameters, "weight_bytes": work.weight_bytes,
                "output": f"{size.width}x{size.height}" + (f", {size.frames} frames" if size.frames > 1 else ""),
                "vae_latents": list(vae_latent_shape(spec, self.scale)),
                "image_tokens": work.image_tokens, "text_tokens": work.text_tokens, "step_tflop": work.step_flops / 1e12,
                "transformer": spec.transformer_class, "vae": spec.vae_class,
                "transformer_config": spec.transformer_kwargs(self.scale), "vae_config": spec.vae_kwargs(self.scale),
                "fp8_ignored_layers": list(spec.fp8_ignored_layers), "sampling": dict(spec.params),
                "default_cfg_passes": spec.default_cfg_passes}
        return ScaleResults(
            command=self.options.command, scale=self.scale.value, device=device_name, dtype="bfloat16",
            torch_version=torch.__version__, diffusers_version=diffusers.__version__, warmup=self.options.warmup,
            repeats=self.options.repeats, budget_s=self.options.budget_s,
            started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), models=models, plan=self.plan(), notes=CAVEATS)

    # ------------------------------------------------------------------ run
    def _write(self) -> dict[str, Path]:
        self.results.elapsed_s = time.perf_counter() - self.started
        add_ratios(self.results, {name: spec.default_cfg_passes for name, spec in self.specs.items()})
        self.results.targets = evaluate_targets(self.results)
        return write_results(self.results, self.options.out)

    def _skip_reason(self, planned: PlannedRow, expected_s: float) -> str | None:
        if (self.options.rows is None and self.device.type == "cpu" and planned.row in CPU_OPT_IN_ROWS):
            return ("compile rows run on a CPU only when named in --rows: one compile takes 20-90 s there "
                    "(ditserve/levers/compile.py)")
        if self.options.budget_s is None:
            return None
        left = self.options.budget_s - (time.perf_counter() - self.started) - BUDGET_RESERVE_S
        if expected_s > left:
            return f"budget: expected {expected_s:.0f} s, {max(left, 0):.0f} s left of --budget-s {self.options.budget_s:g}"
        return None

    def run(self) -> ScaleResults:
        self._write()  # the plan alone, before any row: a run killed during its first row still says what it meant
        for planned in self.results.plan:
            expected_s = self._expected(planned.model, planned.row)
            reason = self._skip_reason(planned, expected_s)
            if reason is not None:
                record = RowResult(planned.model, planned.row, Status.SKIPPED, reason, expected_s=expected_s)
            else:
                record = self._run_row(planned.model, planned.row, expected_s)
            self.results.rows.append(record)
            self._write()
            self._report_progress(planned, record)
        self._release()
        self.results.complete = True
        self._write()
        return self.results

    def _report_progress(self, planned: PlannedRow, record: RowResult) -> None:
        """One line per row on stderr: what a device call's output tail shows if the call is cut off."""
        figures = (f"{record.median_ms:.1f} ms, peak {record.peak_memory_mib:.0f} MiB" if record.status is Status.OK
                   else record.reason)
        print(f"[{planned.order}/{len(self.results.plan)} {time.perf_counter() - self.started:.0f} s] "
              f"{planned.model} {planned.row.value}: {record.status.value} ({figures})", file=sys.stderr, flush=True)

    def _run_row(self, model: str, row: Row, expected_s: float) -> RowResult:
        began = time.perf_counter()
        try:
            record = self._vae_row(model, row) if row.is_vae else self._transformer_row(model, row)
        except DitServeError as error:
            # a lever that refuses this device (FP8 or offload on a CPU) or this model says why
            record = RowResult(model, row, Status.UNAVAILABLE, f"{type(error).__name__}: {error}")
            self._release_if_changed()
        except torch.cuda.OutOfMemoryError as error:
            record = RowResult(model, row, Status.FAILED, f"out of GPU memory: {str(error).splitlines()[0]}")
            self._release()
        except Exception as error:  # noqa: BLE001 - a row that breaks is a finding; the other rows still run
            logger.exception("scale: %s / %s failed", model, row.value)
            record = RowResult(model, row, Status.FAILED, f"{type(error).__name__}: {error}")
            self._release()
        record.expected_s = expected_s
        record.elapsed_s = time.perf_counter() - began
        if record.status is Status.OK and not row.is_vae and row in (Row.OURS, Row.DIFFUSERS, Row.CACHE_NEVER_SKIP):
            # later rows of this model are planned against the measured step rather than the estimate
            self._step_factor[model] = (record.median_ms / 1000) / estimated_step_s(self.workloads[model], self.costs)
        return record

    # ------------------------------------------------------------------ models
    def _release(self) -> None:
        self._built = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _release_if_changed(self) -> None:
        if self._built is not None and not self._built.pristine:
            self._release()

    def _pristine(self, model: str) -> BuiltModel:
        """The model as built: reused while no lever changed it, else built again (same seed, same weights)."""
        built = self._built
        if built is None or built.spec.name != model or not built.pristine:
            self._release()
            spec = self.specs[model]
            built = BuiltModel(spec, build_pipeline(spec, self.scale, self.device, torch.bfloat16, SEED))
            self._built = built
        return built

    def _request(self, built: BuiltModel) -> Request:
        return bench_request(built.loaded, built.spec, self.scale)

    def _reference(self, built: BuiltModel) -> FirstCall:
        """The first step's transformer call of the model as built, in eager bf16 through our runner."""
        if built.reference is None:
            config = lever_config(Row.OURS, built.spec, self.device)
            runner = RecordingRunner(config, built.loaded)
            stepper = LoopStepper(runner, self._request(built))
            try:
                stepper()
                stepper.close()
            finally:
                runner.close()
            assert runner.first_call is not None, "the first step called no transformer"
            built.reference = runner.first_call
        return built.reference

    # ------------------------------------------------------------------ rows
    def _transformer_row(self, model: str, row: Row) -> RowResult:
        built = self._pristine(model)
        reference = self._reference(built)
        if row is Row.DIFFUSERS:
            return self._diffusers_row(built, reference)
        config = lever_config(row, built.spec, self.device)
        if row in MUTATING_ROWS:
            built.pristine = False
            apply_levers(built.loaded, config)
        runner = RecordingRunner(config, built.loaded)
        runner.decodes = False
        stepper = LoopStepper(runner, self._request(built))
        try:
            timing = measure(stepper, self.device, self.options.warmup, self.options.repeats)
            skipped = None
            if runner.cache is not None:
                skipped = int(runner.cache.request_stats(stepper.request.request_id).get("skipped_steps", 0))
            stepper.close()
        finally:
            runner.close()
        assert runner.first_call is not None, "the first step called no transformer"
        record = self._record(model, row, timing, relative_error(runner.first_call.output, reference.output))
        record.skipped_steps = skipped
        record.levers = list(built.loaded.levers)
        if skipped:
            record.status, record.reason = Status.FAILED, f"the never-skip setting skipped {skipped} steps"
        return record

    def _diffusers_row(self, built: BuiltModel, reference: FirstCall) -> RowResult:
        transformer = getattr(built.loaded.pipeline, reference.transformer_name)
        scheduler = copy.deepcopy(reference.scheduler)
        outputs: list[torch.Tensor] = []

        @torch.no_grad()  # as diffusers' pipelines run their __call__
        def step() -> None:
            output = transformer(**reference.kwargs, return_dict=False)[0]
            if not outputs:
                outputs.append(output.detach().float().cpu())
            scheduler.step(output, reference.timestep, reference.sample, return_dict=False)

        timing = measure(step, self.device, self.options.warmup, self.options.repeats)
        return self._record(built.spec.name, Row.DIFFUSERS, timing, relative_error(outputs[0], reference.output))

    def _vae_row(self, model: str, row: Row) -> RowResult:
        self._release()
        spec = self.specs[model]
        loaded = build_pipeline(spec, self.scale, self.device, torch.bfloat16, SEED, with_transformer=False)
        apply_levers(loaded, lever_config(row, spec, self.device))
        latents = torch.randn(vae_latent_shape(spec, self.scale), generator=torch.Generator("cpu").manual_seed(SEED))
        latents = latents.to(self.device, torch.bfloat16)
        vae = loaded.pipeline.vae

        @torch.no_grad()
        def decode() -> None:
            vae.decode(latents, return_dict=False)

        timing = measure(decode, self.device, 1, VAE_REPEATS)
        record = self._record(model, row, timing, None)
        record.levers = list(loaded.levers)
        return record

    @staticmethod
    def _record(model: str, row: Row, timing: Timing, rel_error: float | None) -> RowResult:
        return RowResult(model, row, Status.OK, median_ms=timing.median_ms, samples_ms=timing.samples_ms,
                         first_call_s=timing.first_call_s, peak_memory_mib=timing.peak_memory_bytes / 2**20,
                         memory_kind=timing.memory_kind, rel_error_vs_bf16=rel_error)


def _diffusers_class(name: str) -> Any:
    import diffusers

    return getattr(diffusers, name)


def run_scale(options: ScaleOptions) -> ScaleResults:
    return ScaleBench(options).run()


if __name__ == "__main__":
    from ditserve.bench.scale_cli import main

    sys.exit(main())
