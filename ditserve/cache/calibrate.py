"""Run a model over a prompt set to calibrate its caches (see ``ditserve.cache.calibration`` for the file).

1. Uncached runs with a recording policy: the reference images, and per step the modulated-input change, the
   block-loop output change and the residual magnitude.
2. Fits: TeaCache's rescale polynomial, MagCache's magnitude ratios (written before the sweep, so the swept
   backends use them).
3. Sweep: for each backend, each value of its main knob: fraction of work done, wall-clock speed-up of the
   denoising stage (medians), and PSNR against the reference (mean and worst over the prompts).
"""

from __future__ import annotations

import logging
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ditserve.cache.base import CacheBackend
from ditserve.cache.calibration import (
    FORMAT_VERSION,
    RecordingPolicy,
    StepSeries,
    fit_rescale_polynomial,
    magnitude_ratios,
    model_path_of,
    psnr,
    save_calibration,
)
from ditserve.cache.residual_backend import ResidualCacheBackend
from ditserve.cache.selector import backend_class, build_cache_backend
from ditserve.cache.spec import CacheSpec

logger = logging.getLogger(__name__)

#: main knob values swept per backend, cautious to aggressive
DEFAULT_SWEEPS: dict[str, tuple[float, ...]] = {
    "tea_cache": (0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2),
    "mag_cache": (0.01, 0.03, 0.06, 0.1, 0.2, 0.4, 0.8),
    "cache_dit": (0.02, 0.05, 0.08, 0.12, 0.24, 0.4, 0.8),
}


class RecordingBackend(ResidualCacheBackend):
    """Computes every step and records what calibration fits on."""

    name = "calibration_recorder"
    expected_to_skip = False

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        #: the recorded series of each finished request, by branch label
        self.recorded: dict[str, dict[str, StepSeries]] = {}

    def configure(self, spec: CacheSpec, calibration: dict[str, Any] | None) -> None:
        self.config["transformer_class"] = spec.transformer_class

    def make_policy(self) -> RecordingPolicy:
        return RecordingPolicy()

    def finish(self, request_id: str) -> None:
        self.recorded[request_id] = self._series_of(request_id)
        super().finish(request_id)

    def _series_of(self, request_id: str) -> dict[str, StepSeries]:
        found = {}
        for _, controller in self._controllers:
            for label, record in controller.request_records(request_id).items():
                name = label if controller.transformer_name == "transformer" else f"{controller.transformer_name}:{label}"
                found[name] = record.policy_state
        return found


@dataclass
class RunResult:
    media: np.ndarray
    denoise_s: float
    stats: dict[str, Any] | None


def output_array(output: Any) -> np.ndarray:
    return np.asarray(output.videos[0] if output.videos else output.images[0])


def run_prompts(omni: Any, backend: CacheBackend | None, prompts: Sequence[Any], params: Mapping[str, Any]) -> list[RunResult]:
    """Each prompt alone (cache-dit decides per batch), with ``backend`` as the engine's cache."""
    runner = omni.engine.runner
    runner.cache = backend
    results = []
    try:
        for prompt in prompts:
            output = omni.generate(prompt, dict(params))[0]
            results.append(RunResult(output_array(output), output.timings["denoise_s"], output.cache_stats))
    finally:
        runner.cache = None
    return results


def record_reference(omni: Any, prompts: Sequence[Any], params: Mapping[str, Any]) -> tuple[list[RunResult], dict]:
    """Uncached outputs (recording never skips) and the fitted TeaCache and MagCache data."""
    runner = omni.engine.runner
    recorder = RecordingBackend()
    recorder.enable(runner.model.pipeline, runner.adapter)
    by_branch: dict[str, list[StepSeries]] = defaultdict(list)
    results = []
    try:
        runner.cache = recorder
        for prompt in prompts:
            output = omni.generate(prompt, dict(params))[0]
            results.append(RunResult(output_array(output), output.timings["denoise_s"], None))
            for label, series in recorder.recorded.pop(output.request_id).items():
                by_branch[label].append(series)
    finally:
        runner.cache = None
        recorder.disable(runner.model.pipeline)
    all_series = [s for series in by_branch.values() for s in series]
    fits = {"transformer_class": recorder.config["transformer_class"],
            "tea_cache": fit_rescale_polynomial(all_series), "mag_cache": magnitude_ratios(by_branch)}
    return results, fits


def sweep_backend(omni: Any, name: str, values: Sequence[float], prompts: Sequence[Any],
                  params: Mapping[str, Any], reference: Sequence[RunResult]) -> dict[str, Any]:
    pipeline, adapter = omni.engine.runner.model.pipeline, omni.engine.runner.adapter
    base_time = statistics.median(r.denoise_s for r in reference)
    knob = backend_class(name).main_knob
    rows = []
    for value in values:
        backend = build_cache_backend(name, {knob: value})
        backend.enable(pipeline, adapter)
        try:
            results = run_prompts(omni, backend, prompts, params)
        finally:
            backend.disable(pipeline)
        scores = [psnr(ref.media, r.media) for ref, r in zip(reference, results, strict=True)]
        row = {"value": value, "work_fraction": statistics.mean(r.stats["work_fraction"] for r in results),
               "speedup": base_time / statistics.median(r.denoise_s for r in results),
               "psnr_mean": statistics.mean(scores), "psnr_min": min(scores)}
        logger.info("%s %s=%s: %s", name, knob, value, row)
        rows.append(row)
    return {"knob": knob, "rows": rows}


def calibrate(omni: Any, prompts: Sequence[Any], params: Mapping[str, Any],
              sweeps: Mapping[str, Sequence[float]]) -> tuple[dict[str, Any], str]:
    """Fit, save, sweep, save again; returns the calibration data and the file it was written to."""
    model_path = model_path_of(omni.engine.runner.model.pipeline)
    recorded, fits = record_reference(omni, prompts, params)
    # timings of a plain uncached pass, after the recording pass warmed everything up
    reference = run_prompts(omni, None, prompts, params)
    if any(not np.array_equal(r.media, p.media) for r, p in zip(recorded, reference, strict=True)):
        raise RuntimeError("the recording pass changed the output: calibration would be wrong")
    # the model as the user named it: a machine's absolute path would travel with a shipped file
    data: dict[str, Any] = {"format": FORMAT_VERSION, "model": omni.engine.runner.model.name,
                            "params": dict(params),
                            "prompts": [str(p) for p in prompts], **fits, "quality_table": {}}
    path = save_calibration(model_path, data)
    for name, values in sweeps.items():
        data["quality_table"][name] = sweep_backend(omni, name, values, prompts, params, reference)
        path = save_calibration(model_path, data)
    return data, str(path)
