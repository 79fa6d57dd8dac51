"""Run a model over prompt sets to calibrate its caches (see ``ditserve.cache.calibration`` for the file).

1. Uncached runs with a recording policy on the search prompts: the reference images, and per step the
   modulated-input change, the block-loop output change and the residual magnitude; plain uncached runs of the
   held-out prompts.
2. Fits: TeaCache's rescale polynomial, MagCache's magnitude ratios (written before the search, so the searched
   backends use them).
3. Search: for each backend, a Pareto local search over its knobs (``ditserve.cache.search``) on the search
   prompts, then its front measured again on the held-out prompts, which the search never saw: the quality table
   holds those figures (work fraction, mean and worst-prompt PSNR against the uncached image).

Prompt i of a set runs with seed ``seed + i``, so the worst prompt is also drawn over several noises.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ditserve.cache.calibration import (
    FORMAT_VERSION,
    RecordingPolicy,
    StepSeries,
    fit_rescale_polynomial,
    load_calibration,
    magnitude_ratios,
    model_path_of,
    psnr,
    save_calibration,
)
from ditserve.cache.quality_table import QualityPoint, QualityTable, mark_front
from ditserve.cache.residual_backend import ResidualCacheBackend, branch_label
from ditserve.cache.search import (
    Config,
    EvaluationStatus,
    Evaluator,
    ParetoSearch,
    PromptMeasurement,
    SearchResult,
    SearchSpace,
    remeasure,
)
from ditserve.cache.selector import backend_class, build_cache_backend
from ditserve.cache.spec import CacheSpec

logger = logging.getLogger(__name__)

#: denoising work a backend's search may spend, in uncached generations (a generation costs its work fraction),
#: unless told otherwise: a round of the search costs about (front points x neighbours per point), and a point
#: has two neighbours per knob, so a space of three knobs or more (MagCache's 3, Cache-DiT's 9) gets twice the
#: budget of a smaller one. Counted in generations (200), MagCache's cheap configs (work 0.14-0.3) ran out on the
#: demo while measuring the K-only points at retention 0.1 (60 generations of work spent, Cache-DiT's 105)
DEFAULT_BUDGET = 50.0
MANY_KNOBS = 3


def default_budget(space: SearchSpace) -> float:
    return 2 * DEFAULT_BUDGET if len(space.knobs) >= MANY_KNOBS else DEFAULT_BUDGET


def search_space(name: str) -> SearchSpace:
    """A backend's declared knobs, seeded from its defaults with the main threshold at each seed value, and from
    its further start points."""
    cls = backend_class(name)
    defaults = {knob.name: cls.defaults[knob.name] for knob in cls.search_knobs}
    seeds = tuple({**defaults, cls.main_knob: value} for value in cls.search_seeds)
    return SearchSpace(cls.search_knobs, seeds + tuple({**defaults, **point} for point in cls.search_start_points))


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

    def make_policy(self, transformer_name: str) -> RecordingPolicy:
        return RecordingPolicy()

    def finish(self, request_id: str) -> None:
        self.recorded[request_id] = self._series_of(request_id)
        super().finish(request_id)

    def _series_of(self, request_id: str) -> dict[str, StepSeries]:
        found = {}
        for _, controller in self._controllers:
            for label, record in controller.request_records(request_id).items():
                found[branch_label(controller.transformer_name, label)] = record.policy_state
        return found


def output_array(output: Any) -> np.ndarray:
    return np.asarray(output.videos[0] if output.videos else output.images[0])


def item_label(item: Any) -> str:
    """How the calibration file names a prompt: the prompt itself, or for one with input pictures its text and a
    digest of their pixels (paths: of the path), which stays the same between runs where a picture's repr would
    hold a memory address."""
    images = (item.get("multi_modal_data") or {}).get("image") if isinstance(item, Mapping) else None
    if images is None:
        return str(item)
    digest = hashlib.sha256()
    for image in images if isinstance(images, list) else [images]:
        digest.update(str(image).encode() if isinstance(image, (str, os.PathLike))
                      else np.ascontiguousarray(np.asarray(image)).tobytes())
    return f"{item.get('prompt', '')} [input pictures {digest.hexdigest()[:12]}]"


def seeded(params: Mapping[str, Any], index: int) -> dict[str, Any]:
    return {**params, "seed": params.get("seed", 0) + index}


def run_uncached(omni: Any, prompts: Sequence[Any], params: Mapping[str, Any]) -> list[np.ndarray]:
    """Each prompt's uncached output."""
    return [output_array(omni.generate(prompt, seeded(params, index))[0]) for index, prompt in enumerate(prompts)]


def record_reference(omni: Any, prompts: Sequence[Any], params: Mapping[str, Any]) -> tuple[list[np.ndarray], dict]:
    """Uncached outputs (recording never skips) and the fitted TeaCache and MagCache data."""
    runner = omni.engine.runner
    recorder = RecordingBackend()
    recorder.enable(runner.model.pipeline, runner.adapter)
    by_branch: dict[str, list[StepSeries]] = defaultdict(list)
    results = []
    try:
        runner.cache = recorder
        for index, prompt in enumerate(prompts):
            output = omni.generate(prompt, seeded(params, index))[0]
            results.append(output_array(output))
            for label, series in recorder.recorded.pop(output.request_id).items():
                by_branch[label].append(series)
    finally:
        runner.cache = None
        recorder.disable(runner.model.pipeline)
    all_series = [s for series in by_branch.values() for s in series]
    fits = {"transformer_class": recorder.config["transformer_class"],
            "tea_cache": fit_rescale_polynomial(all_series), "mag_cache": magnitude_ratios(by_branch)}
    return results, fits


class EngineEvaluator(Evaluator):
    """One of our backends on the engine: each prompt's work fraction (from the cache's statistics) and its PSNR
    against the uncached image of the same prompt and seed."""

    def __init__(self, omni: Any, backend: str, prompts: Sequence[Any], params: Mapping[str, Any],
                 reference: Sequence[np.ndarray]) -> None:
        self.omni, self.backend, self.prompts, self.params = omni, backend, list(prompts), dict(params)
        self.reference = list(reference)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

    @contextlib.contextmanager
    def session(self, config: Config) -> Iterator[Callable[[int], PromptMeasurement]]:
        runner = self.omni.engine.runner
        backend = build_cache_backend(self.backend, config)
        backend.enable(runner.model.pipeline, runner.adapter)
        runner.cache = backend
        try:
            yield self._measure
        finally:
            runner.cache = None
            backend.disable(runner.model.pipeline)

    def outcome_key(self, config: Config) -> str | None:
        steps = self.params.get("num_inference_steps")
        if not steps:
            return None
        runner = self.omni.engine.runner
        plan = build_cache_backend(self.backend, config).planned_decisions(runner.model.pipeline, runner.adapter,
                                                                            steps)
        return None if plan is None else json.dumps(plan, sort_keys=True)

    def _measure(self, index: int) -> PromptMeasurement:
        output = self.omni.generate(self.prompts[index], seeded(self.params, index))[0]
        return PromptMeasurement(output.cache_stats["work_fraction"],
                                 psnr(self.reference[index], output_array(output)))


@dataclass
class BackendCalibration:
    """One backend's search and the table made from it."""

    search: SearchResult
    table: QualityTable


@dataclass
class CalibrationRun:
    data: dict[str, Any]
    path: str
    backends: dict[str, BackendCalibration] = field(default_factory=dict)


def search_backend(omni: Any, name: str, space: SearchSpace, budget: float, prompts: Sequence[Any],
                   holdout: Sequence[Any], params: Mapping[str, Any], reference: Sequence[np.ndarray],
                   holdout_reference: Sequence[np.ndarray]) -> BackendCalibration:
    """The search on ``prompts``, then its front measured on ``holdout`` (the table's figures)."""
    result = ParetoSearch(space, EngineEvaluator(omni, name, prompts, params, reference), budget).run()
    # only the points a target can resolve to are worth their held-out generations
    front = result.useful_front()
    held = list(remeasure(EngineEvaluator(omni, name, holdout, params, holdout_reference), [e.config for e in front]))
    points = [QualityPoint(h.config, h.work_fraction, h.psnr_mean, h.psnr_min, s.work_fraction, s.psnr_min)
              for s, h in zip(front, held, strict=True)]
    summary = {"prompts": len(prompts), "holdout_prompts": len(holdout), "budget": budget,
               "generations": result.generations, "work_spent": round(result.work_spent, 2),
               "holdout_generations": len(front) * len(holdout),
               "evaluated": len(result.evaluations), "reused": result.count_reused(),
               **{status.value: result.count(status) for status in EvaluationStatus}}
    table = QualityTable(name, tuple(k.name for k in space.knobs), tuple(mark_front(points)), summary)
    return BackendCalibration(result, table)


def kept_tables(previous: Mapping[str, Any] | None, data: Mapping[str, Any],
                backends: Sequence[str]) -> dict[str, Any]:
    """The previous file's tables of the backends not searched now, when they were measured the same way (same
    format, params and prompt sets), so a backend can be searched again without losing the others."""
    if not previous or any(previous.get(k) != data[k] for k in ("format", "params", "prompts", "holdout_prompts")):
        return {}
    return {name: table for name, table in previous.get("quality_table", {}).items() if name not in backends}


def calibrate(omni: Any, prompts: Sequence[Any], holdout: Sequence[Any], params: Mapping[str, Any],
              backends: Sequence[str], budget: float | None = None,
              spaces: Mapping[str, SearchSpace] | None = None) -> CalibrationRun:
    """Fit, save, search each backend (over ``spaces[name]`` or its declared knobs, spending ``budget`` or its
    default budget), save after each."""
    model_path = model_path_of(omni.engine.runner.model.pipeline)
    for name in backends:
        backend_class(name)  # an unknown name is an error naming the known ones, before any generation
    recorded, fits = record_reference(omni, prompts, params)
    # a plain uncached pass, to check that recording changed nothing
    reference = run_uncached(omni, prompts, params)
    if any(not np.array_equal(r, p) for r, p in zip(recorded, reference, strict=True)):
        raise RuntimeError("the recording pass changed the output: calibration would be wrong")
    holdout_reference = run_uncached(omni, holdout, params)
    # the model as the user named it: a machine's absolute path would travel with a shipped file
    data: dict[str, Any] = {"format": FORMAT_VERSION, "model": omni.engine.runner.model.name,
                            "params": dict(params), "prompts": [item_label(p) for p in prompts],
                            "holdout_prompts": [item_label(p) for p in holdout], **fits, "quality_table": {}}
    data["quality_table"] = kept_tables(load_calibration(model_path), data, backends)
    run = CalibrationRun(data, str(save_calibration(model_path, data)))
    for name in backends:
        space = (spaces or {}).get(name) or search_space(name)
        calibrated = search_backend(omni, name, space, budget or default_budget(space), prompts, holdout, params,
                                    reference, holdout_reference)
        run.backends[name] = calibrated
        data["quality_table"][name] = calibrated.table.to_json()
        run.path = str(save_calibration(model_path, data))
    return run
