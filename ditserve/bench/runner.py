"""One bench run: baselines, our cache backends and the peers on the same prompts, seeds, dtype and steps.

Timing rules: the run goes through the whole plan ``repeats`` times (rounds); in each round every setting makes
a warm-up image (excluded) and one image of every prompt, and ours and the peers alternate. Every setting's
samples are thus spread over the whole run, so a slow spell of a shared machine weighs on all rows alike
instead of on the few measured during it. The baselines are timed in every round and once more at the end;
each of their passes is reported.
Quality rules: every image is compared with the uncached image of the same prompt and seed made by the same
system (ours against ditserve uncached, peers against diffusers uncached), so a row's loss is its cache's
alone; the two uncached systems are compared with each other once, as a parity check.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ditserve.bench import peers
from ditserve.bench.metrics import mean, median, psnr_db, ssim
from ditserve.bench.plan import OUR_METHODS, OurFronts, PeerFronts, RunSpec, full_plan, quick_plan
from ditserve.bench.systems import BenchItem, DiffusersSystem, DitserveSystem, SampleResult
from ditserve.config import OmniDiffusionSamplingParams
from ditserve.demo import DEMO_EDIT_MODEL_NAME, DEMO_MODEL_NAME
from ditserve.errors import DitServeError, InvalidParameterError
from ditserve.models.base import InputImages, ModelKind

logger = logging.getLogger(__name__)

#: warm-up images of each baseline in the first round beyond the one every setting gets
BASELINE_EXTRA_WARMUPS = 1

#: what a record's "adherence" is, by model: the demo checkers' figure on the first round's images
ADHERENCE_MEASURES = {DEMO_MODEL_NAME: "object accuracy (demo checker)",
                      DEMO_EDIT_MODEL_NAME: "pass rate (edit checker: instruction applied, the rest kept)"}

#: the edit demo's held-out edits the bench runs are drawn with this seed (its calibration's with another)
DEMO_EDIT_SEED = 0

#: prompts for models other than the demo (any tokenizer splits them; the tiny test models know these words)
GENERIC_PROMPTS = ("a red circle on the left", "a small blue square at the top", "a large green triangle",
                   "a cat sitting on the windowsill", "a dog in the center", "a blue circle and a red square")


@dataclass
class BenchOptions:
    #: diffusers folder or hub id; None: the bundled demo model
    model: str | None = None
    steps: int = 50
    num_prompts: int = 4
    repeats: int = 2
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    height: int | None = None
    width: int | None = None
    #: video models only (None: the model's default)
    num_frames: int | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None
    quick: bool = False
    show_progress: bool = True
    #: run only the settings whose label contains one of these words (case-insensitive); empty: all
    only: Sequence[str] = ()
    #: torch CPU threads for every system (None: torch's default); fewer threads than cores keep timings
    #: steadier on a machine shared with other work
    cpu_threads: int | None = None
    #: denoising work each peer's knob search may spend, in uncached generations (0: no search, the peers run
    #: their fixed sweeps)
    search_peers: float = 0


@dataclass
class Samples:
    """The samples (images or videos) of one setting: ``images[round][prompt]``."""

    images: list[list[SampleResult]] = field(default_factory=list)

    def all(self) -> list[SampleResult]:
        return [image for row in self.images for image in row]

    def first_repeat(self) -> list[SampleResult]:
        return self.images[0]


def choose_prompts(is_demo: bool, count: int) -> list[str]:
    if is_demo:
        from ditserve.demo import heldout_prompts

        return heldout_prompts(count)
    return [GENERIC_PROMPTS[i % len(GENERIC_PROMPTS)] for i in range(count)]


def choose_items(model_name: str, needs_images: bool, count: int) -> list[BenchItem]:
    """The bench's prompts: the demo's held-out prompts, the edit demo's held-out edits (seed 0; calibration
    uses seed 1) with their input pictures, or generic prompts. An edit model other than the edit demo would need
    input pictures the bench does not have."""
    if model_name == DEMO_EDIT_MODEL_NAME:
        from ditserve.demo.edit_evaluation import heldout_edit_inputs

        edits, pictures = heldout_edit_inputs(count, seed=DEMO_EDIT_SEED)
        return [BenchItem(edit.instruction, picture) for edit, picture in zip(edits, pictures, strict=True)]
    if needs_images:
        raise InvalidParameterError(f"{model_name} edits input pictures, and the bench has them only for "
                                    f"{DEMO_EDIT_MODEL_NAME}'s edits", param="model")
    return [BenchItem(prompt) for prompt in choose_prompts(model_name == DEMO_MODEL_NAME, count)]


def interleave(ours: Sequence[RunSpec], others: Sequence[RunSpec]) -> list[RunSpec]:
    pairs = itertools.zip_longest(ours, others)
    return [spec for pair in pairs for spec in pair if spec is not None]


def select_plan(options: BenchOptions, ours: OurFronts | None = None,
                searched_peers: PeerFronts | None = None) -> list[RunSpec]:
    plan = quick_plan() if options.quick else full_plan(ours, searched_peers)
    if options.only:
        words = [w.lower() for w in options.only]
        plan = [s for s in plan if s.group == "baseline" or any(w in s.label.lower() for w in words)]
    baselines = [s for s in plan if s.group == "baseline"]
    return baselines + interleave([s for s in plan if s.group == "ours"], [s for s in plan if s.group == "peer"])


class Progress:
    """A tqdm bar over every image the bench makes (warm-ups included)."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="img", disable=not enabled, dynamic_ncols=True)

    def start(self, label: str) -> None:
        self.bar.set_description(label[:60])

    def advance(self, count: int = 1) -> None:
        self.bar.update(count)

    def close(self) -> None:
        self.bar.close()


class Bench:
    def __init__(self, options: BenchOptions) -> None:
        self.options = options
        self.plan = select_plan(options)
        self.engine_options = {"model": options.model, "device": options.device, "dtype": options.dtype}
        self.records: list[dict[str, Any]] = []
        self._mag_ratios: list[float] | None = None
        self._cache_dit_pipeline: DiffusersSystem | None = None
        #: what each peer's knob search did (None when the peers were not searched)
        self.search_records: dict[str, Any] | None = None

    # ------------------------------------------------------------------ set-up
    def _sampling(self, system: DitserveSystem) -> OmniDiffusionSamplingParams:
        o = self.options
        asked = {"num_inference_steps": o.steps, "height": o.height, "width": o.width, "num_frames": o.num_frames,
                 "true_cfg_scale": o.true_cfg_scale, "negative_prompt": o.negative_prompt}
        return system.resolve(OmniDiffusionSamplingParams(**{k: v for k, v in asked.items() if v is not None}))

    def _diffusers_system(self) -> DiffusersSystem:
        loaded = self.loaded
        return DiffusersSystem(loaded.path, loaded.device, loaded.dtype,
                               loaded.adapter.diffusers_call_arguments(), video=loaded.adapter.kind is ModelKind.VIDEO)

    def _seeded(self, prompt_index: int) -> OmniDiffusionSamplingParams:
        return self.params.replace(seed=self.options.seed + prompt_index)

    def images_per_round(self) -> int:
        """Images one setting makes in one round: a warm-up and one per prompt."""
        return 1 + len(self.items)

    # ------------------------------------------------------------------ measuring
    def _measure_round(self, generate: Callable[[BenchItem, OmniDiffusionSamplingParams], SampleResult],
                       warmups: int = 1) -> list[SampleResult]:
        for _ in range(warmups):  # excluded from every figure
            generate(self.items[0], self._seeded(0))
            self.progress.advance()
        row = []
        for index, item in enumerate(self.items):
            row.append(generate(item, self._seeded(index)))
            self.progress.advance()
        return row

    def _run_ours(self, spec: RunSpec) -> tuple[list[SampleResult], dict[str, Any]]:
        from ditserve.cache.selector import available_backends

        if spec.backend not in available_backends():
            raise peers.MethodUnavailableError(
                f"cache_backend {spec.backend!r} is not registered in this build; available: {available_backends()}")
        system = DitserveSystem(self.engine_options, spec.backend, spec.config)
        try:
            return self._measure_round(system.generate), {"counted_reliably": system.counter.is_reliable()}
        finally:
            system.close()

    def _cache_dit_system(self) -> DiffusersSystem:
        """A pipeline of its own for the cache-dit library: ``cache_dit.disable_cache`` leaves the transformer's
        forward patched (seen with FLUX: diffusers' hooks applied afterwards then fail), so the library never
        touches the pipeline that the baseline and diffusers' hooks run on."""
        if self._cache_dit_pipeline is None:
            self._cache_dit_pipeline = self._diffusers_system()
            self._cache_dit_pipeline.generate(self.items[0], self._seeded(0))  # a new pipeline's first call
            self.progress.advance()
        return self._cache_dit_pipeline

    def _run_peer(self, spec: RunSpec) -> tuple[list[SampleResult], dict[str, Any]]:
        system = self._cache_dit_system() if spec.system == "cache-dit" else self.diffusers
        if spec.system == "cache-dit":
            arguments = peers.cache_dit_arguments(spec.config, self.params.num_inference_steps)
            applied = peers.cache_dit_library(system.pipeline, arguments)
        else:
            ratios = self._diffusers_mag_ratios() if spec.method == "MagCache" else None
            hook_config = peers.diffusers_hook_config(spec.method, spec.config, system.pipeline,
                                                      self.params.num_inference_steps, ratios)
            applied = peers.diffusers_cache(system.pipeline, hook_config)
        with applied:
            reliable = system.counter.is_reliable()
            return self._measure_round(system.generate), {"counted_reliably": reliable}

    def _diffusers_mag_ratios(self) -> list[float]:
        if self._mag_ratios is None:
            self._mag_ratios = peers.calibrate_diffusers_mag_ratios(
                self.diffusers.pipeline, self.params.num_inference_steps,
                lambda: self.diffusers.generate(self.items[0], self._seeded(0)))
            self.progress.advance()
        return self._mag_ratios

    # ------------------------------------------------------------------ searched fronts
    def _calibration(self) -> dict[str, Any]:
        from ditserve.cache.calibration import load_calibration

        return load_calibration(self.loaded.path) or {}

    def _calibrated_fronts(self) -> dict[str, list[dict[str, Any]]]:
        """Each of our backends' front from the model's calibration file (searched, format 2), by backend."""
        from ditserve.cache.quality_table import quality_table

        calibration = self._calibration()
        fronts = {}
        for backend in OUR_METHODS:
            table = quality_table(calibration, backend) if calibration.get("format", 1) >= 2 else None
            if table is not None:
                fronts[backend] = [p.config for p in table.front()]
        return fronts

    def _search_peers(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        """The knob search of every peer that exposes knobs, on our calibration's search prompts and seeds."""
        from ditserve.bench import peer_search

        calibration = self._calibration()
        if calibration.get("format", 1) < 2 or "prompts" not in calibration:
            raise InvalidParameterError(
                f"--search-peers searches on the prompts of our own search, and {self.loaded.path} has no searched "
                "calibration: run 'ditserve calibrate' first", param="search_peers")
        steps = calibration["params"]["num_inference_steps"]
        if steps != self.params.num_inference_steps:
            raise InvalidParameterError(
                f"--steps {self.params.num_inference_steps}, but our calibration was searched at {steps} steps: "
                "the peers must be searched at the steps ours were", param="steps")
        # the search's generations are not in the progress bar: their number is known only at the end
        self.progress = Progress(0, enabled=False)
        base_seed = calibration["params"].get("seed", 0)
        prompts = self._calibration_items(calibration["prompts"])
        params = [self.params.replace(seed=base_seed + i) for i in range(len(prompts))]
        uncached = [self.diffusers.generate(p, q) for p, q in zip(prompts, params, strict=True)]
        steps = self.params.num_inference_steps
        self.search_records = {}
        fronts = {}
        for system, method in peer_search.PEER_SPACES:
            if system == "cache-dit":
                pipeline = self._cache_dit_system()
                applied = peer_search.cache_dit_library(pipeline.pipeline, steps, self._runs_guidance())
            else:
                pipeline = self.diffusers
                applied = peer_search.diffusers_hooks(pipeline.pipeline, method, steps, self._diffusers_mag_ratios)
            setup = peer_search.PeerSetup(pipeline, prompts, params, uncached)
            try:
                result = peer_search.search_peer(setup, system, method, self.options.search_peers, applied)
            except peers.MethodUnavailableError as error:
                # its rows then report the same reason
                self.search_records[f"{system} {method}"] = {"unavailable": str(error)}
                continue
            fronts[(system, method)] = peer_search.front_configs(result)
            self.search_records[f"{system} {method}"] = {
                "generations": result.generations, "work_spent": round(result.work_spent, 2),
                "evaluated": len(result.evaluations),
                "front": [{"config": e.config, "work_fraction": e.work_fraction, "psnr_min": e.psnr_min,
                           "psnr_mean": e.psnr_mean} for e in result.front()]}
        return fronts

    def _calibration_items(self, labels: Sequence[str]) -> list[BenchItem]:
        """The items our calibration searched on, from their labels in its file: prompts as they are; the edit
        demo's edits made again (their input pictures are not in the file), checked against the labels."""
        from ditserve.cache.calibrate import item_label
        from ditserve.cache.calibrate_cli import demo_edit_items

        if self.loaded.name == DEMO_EDIT_MODEL_NAME:
            items = [BenchItem.from_omni_input(item) for item in demo_edit_items(len(labels))]
        else:
            items = [BenchItem(label) for label in labels]
        if [item_label(item.omni_input()) for item in items] != list(labels):
            raise InvalidParameterError(
                f"--search-peers: {self.loaded.path}'s calibration searched on prompts with input pictures the bench "
                "cannot make again", param="search_peers")
        return items

    # ------------------------------------------------------------------ records
    def _quality(self, samples: Samples, reference: Samples) -> dict[str, Any]:
        pairs = list(zip(samples.first_repeat(), reference.first_repeat(), strict=True))
        psnrs = [psnr_db(a.media, b.media) for a, b in pairs]
        return {"psnr_db": mean(psnrs), "psnr_min_db": min(psnrs), "ssim": mean([ssim(a.media, b.media) for a, b in pairs])}

    def _compute_fraction(self, samples: Samples, reference: Samples) -> float:
        done = sum(r.work_units for r in samples.first_repeat())
        full = sum(r.work_units for r in reference.first_repeat())
        return done / full if full else float("nan")

    def _adherence(self, samples: Samples) -> float | None:
        """The demo's checker on the first round's images: object accuracy, or the edit demo's pass rate."""
        from ditserve.demo import evaluate

        images = [r.media for r in samples.first_repeat()]
        if self.loaded.name == DEMO_MODEL_NAME:
            return evaluate(images, [item.prompt for item in self.items])["object_accuracy"]
        if self.loaded.name == DEMO_EDIT_MODEL_NAME:
            from ditserve.demo.edit_checker import evaluate_edits
            from ditserve.demo.edit_language import heldout_edits

            # the edits of choose_items, without rendering their input pictures again
            return evaluate_edits(images, heldout_edits(len(images), seed=DEMO_EDIT_SEED))["pass_rate"]
        return None

    @staticmethod
    def _timings(images: Sequence[SampleResult]) -> dict[str, Any]:
        denoise = [r.denoise_s for r in images if r.denoise_s is not None]
        return {"samples": len(images), "median_s": median([r.wall_s for r in images]),
                "denoise_median_s": median(denoise) if denoise else None}

    @staticmethod
    def _reported_work_fraction(samples: Samples) -> float | None:
        """The work fraction the cache itself reports (ours), to set beside the counted one."""
        reported = [r.cache_stats.get("work_fraction") for r in samples.first_repeat() if r.cache_stats]
        reported = [value for value in reported if isinstance(value, (int, float))]
        return mean(reported) if reported else None

    def _record(self, spec: RunSpec, samples: Samples, reference: Samples, extra: dict[str, Any]) -> dict[str, Any]:
        stats = samples.first_repeat()[0].cache_stats
        return {
            **self._spec_fields(spec), "status": "ok", **self._timings(samples.all()),
            "compute_fraction": self._compute_fraction(samples, reference),
            "reported_work_fraction": self._reported_work_fraction(samples),
            **self._quality(samples, reference), "adherence": self._adherence(samples),
            "cache_stats_first_image": _scalars(stats) if stats else None, **extra,
        }

    @staticmethod
    def _spec_fields(spec: RunSpec) -> dict[str, Any]:
        return {"system": spec.system, "method": spec.method, "group": spec.group, "backend": spec.backend,
                "config": spec.config, "label": spec.label}

    def _unavailable(self, spec: RunSpec, reason: str, status: str) -> dict[str, Any]:
        return {**self._spec_fields(spec), "status": status, "reason": reason}

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        started = time.time()
        if self.options.cpu_threads is not None:
            torch.set_num_threads(self.options.cpu_threads)
        ditserve_plain = DitserveSystem(self.engine_options)
        self.loaded = loaded = ditserve_plain.omni.engine.runner.model
        adapter = ditserve_plain.omni.engine.adapter
        self.items = choose_items(loaded.name, adapter.input_images is InputImages.REQUIRED, self.options.num_prompts)
        self.params = self._sampling(ditserve_plain)
        self.diffusers = self._diffusers_system()
        self.baseline_systems = {"ditserve": ditserve_plain, "diffusers": self.diffusers}
        ignored = self.diffusers.call_arguments(self.params)[1]
        if not self.options.quick:
            searched = self._search_peers() if self.options.search_peers else {}
            self.plan = select_plan(self.options, self._calibrated_fronts(), searched)
        calibration = self._mag_ratios is None and any(
            s.system == "diffusers" and s.method == "MagCache" for s in self.plan)
        cache_dit_warmup = self._cache_dit_pipeline is None and any(s.system == "cache-dit" for s in self.plan)
        final_baseline_pass = len(self.baseline_systems) * len(self.items)
        self.progress = Progress(len(self.plan) * self.options.repeats * self.images_per_round()
                                 + BASELINE_EXTRA_WARMUPS * 2 + final_baseline_pass + calibration + cache_dit_warmup,
                                 self.options.show_progress)
        try:
            samples, extras, failed = self._run_rounds()
        finally:
            self.progress.close()
            ditserve_plain.close()
            self.diffusers.close()
            if self._cache_dit_pipeline is not None:
                self._cache_dit_pipeline.close()
        references = {spec.system: samples[spec.key()] for spec in self.plan if spec.group == "baseline"}
        for spec in self.plan:
            if spec.key() in failed:
                self.records.append(failed[spec.key()])
                continue
            reference = references["ditserve" if spec.system == "ditserve" else "diffusers"]
            aligned = self._with_guidance_layout(spec)
            self.records.append(self._record(aligned, samples[spec.key()], reference, extras[spec.key()]))
        per_pass = {system: [median([r.wall_s for r in row]) for row in samples.images]
                    for system, samples in references.items()}
        parity = self._quality(references["ditserve"], references["diffusers"])
        self._add_speedups()
        return self._results(loaded, started, per_pass, parity, ignored)

    def _run_rounds(self) -> tuple[dict[str, Samples], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """Every setting's rows, one per round (baselines: one more at the end), its extra fields, and the
        records of the settings that could not run (tried once, in the first round)."""
        samples = {spec.key(): Samples() for spec in self.plan}
        extras: dict[str, dict[str, Any]] = {}
        failed: dict[str, dict[str, Any]] = {}
        for round_index in range(self.options.repeats):
            for spec in self.plan:
                self.progress.start(f"[{round_index + 1}/{self.options.repeats}] {spec.label}")
                if spec.group == "baseline":
                    # the process's first calls of a system pay one-off costs (kernel selection, lazy imports)
                    warmups = 1 + (BASELINE_EXTRA_WARMUPS if round_index == 0 else 0)
                    samples[spec.key()].images.append(
                        self._measure_round(self.baseline_systems[spec.system].generate, warmups))
                    extras[spec.key()] = {"counted_reliably": True}
                elif spec.key() in failed:
                    self.progress.advance(self.images_per_round())
                else:
                    outcome = self._run_setting(spec)
                    if isinstance(outcome, dict):
                        failed[spec.key()] = outcome
                    else:
                        samples[spec.key()].images.append(outcome[0])
                        extras[spec.key()] = outcome[1]
        for spec in self.plan:
            if spec.group == "baseline":
                self.progress.start(f"{spec.label} (final timing pass)")
                samples[spec.key()].images.append(self._measure_round(self.baseline_systems[spec.system].generate, 0))
        return samples, extras, failed

    def _runs_guidance(self) -> bool:
        """Whether the bench's requests run an unconditional pass (true CFG, or a video model's CFG), as the
        model's adapter decides it for ditserve."""
        from ditserve.request import Request

        return bool(self.loaded.adapter.uses_guidance(Request(prompt=self.items[0].prompt, params=self.params)))

    def _with_guidance_layout(self, spec: RunSpec) -> RunSpec:
        """Cache-DiT, ours and the library alike, is told whether guidance runs as separate cond/uncond passes
        (each then keeps its own cache); left to defaults the two could differ and the rows would compare a
        setting, not an engine. The value is recorded in the row's config."""
        uses_cache_dit = spec.backend == "cache_dit" or spec.system == "cache-dit"
        if not uses_cache_dit or "enable_separate_cfg" in spec.config:
            return spec
        return dataclasses.replace(spec, config={**spec.config, "enable_separate_cfg": self._runs_guidance()})

    def _run_setting(self, spec: RunSpec) -> tuple[list[SampleResult], dict[str, Any]] | dict[str, Any]:
        """One round of a setting: its row of images and extra fields, or the record saying why it cannot run."""
        spec = self._with_guidance_layout(spec)
        run = self._run_ours if spec.group == "ours" else self._run_peer
        try:
            return run(spec)
        except peers.MethodUnavailableError as error:
            self.progress.advance(self.images_per_round())
            return self._unavailable(spec, str(error), "unavailable")
        except (DitServeError, ValueError, TypeError, RuntimeError, AssertionError) as error:
            # a method that breaks on this model is a finding to report, not a reason to lose the whole run
            logger.warning("%s failed", spec.label, exc_info=True)
            self.progress.advance(self.images_per_round())
            return self._unavailable(spec, f"{type(error).__name__}: {error}", "failed")

    def _add_speedups(self) -> None:
        baseline = {r["system"]: r for r in self.records if r["group"] == "baseline"}
        for record in self.records:
            if record["status"] != "ok":
                continue
            for system in ("ditserve", "diffusers"):
                record[f"speedup_vs_{system}_uncached"] = baseline[system]["median_s"] / record["median_s"]
                if record["denoise_median_s"] and baseline[system]["denoise_median_s"]:
                    record[f"denoise_speedup_vs_{system}_uncached"] = (
                        baseline[system]["denoise_median_s"] / record["denoise_median_s"])
            # the common reference: the time a user of plain diffusers starts from
            record["speedup"] = record["speedup_vs_diffusers_uncached"]
            # what the wall time would give with the skipped work free: steady on a busy machine
            fraction = record["compute_fraction"]
            record["work_speedup"] = 1 / fraction if fraction and not math.isnan(fraction) else None

    def _results(self, loaded: Any, started: float, drift: dict[str, list[float]], parity: dict[str, Any],
                 ignored: list[str]) -> dict[str, Any]:
        import diffusers

        return {
            "model": loaded.name, "model_path": loaded.path, "device": _device_name(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."), "torch_version": torch.__version__,
            "diffusers_version": diffusers.__version__, "cache_dit_version": _cache_dit_version(),
            "cpu_count": _cpu_count(), "torch_cpu_threads": torch.get_num_threads(), "platform": platform.platform(),
            "steps": self.params.num_inference_steps, "prompts": [item.prompt for item in self.items],
            "input_pictures": any(item.image is not None for item in self.items), "repeats": self.options.repeats,
            "adherence_measure": ADHERENCE_MEASURES.get(loaded.name),
            "seeds": [self.options.seed + i for i in range(len(self.items))],
            "sampling": {k: v for k, v in vars(self.params).items() if v is not None and k != "seed"},
            "params_diffusers_does_not_take": ignored, "quick": self.options.quick,
            "baseline_median_s_per_pass": drift, "uncached_parity": parity, "prompt_embed_cache": False,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            "duration_s": time.time() - started, "records": self.records,
            "peer_search": self.search_records,
        }


def _scalars(stats: dict[str, Any]) -> dict[str, Any]:
    """The scalar fields of a cache-stats mapping (per-step lists stay out of the report)."""
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool)) or v is None}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()})"


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _cache_dit_version() -> str | None:
    try:
        import cache_dit
    except ImportError:
        return None
    return cache_dit.__version__


def run_bench(options: BenchOptions) -> dict[str, Any]:
    return Bench(options).run()
