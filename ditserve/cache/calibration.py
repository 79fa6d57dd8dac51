"""Calibration data of a model: where it lives, how it is fitted, and how a quality target is resolved.

``ditserve calibrate MODEL`` (``calibrate_cli``) runs the uncached model, records per step the change of the
first block's modulated input, the change of the block loop's output and the magnitude of its residual, and
fits from them TeaCache's rescale polynomial and MagCache's magnitude ratios. It also searches each backend's
knobs for the Pareto front of work against worst-prompt PSNR (``ditserve.cache.search``) and measures that front
on held-out prompts: the quality table (``ditserve.cache.quality_table``) that ``target_psnr`` and ``quality``
resolve against. The file sits in the model folder (``ditserve_calibration.json``) when that is
writable, else in the user cache directory keyed by the model id.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditserve.cache.hooks import Decision, SkipPolicy, relative_l1
from ditserve.cache.quality_table import Resolution, choose_point, quality_table
from ditserve.errors import CacheConfigError

CALIBRATION_FILE = "ditserve_calibration.json"
#: written by ``ditserve calibrate``; format 1 files (one knob swept) are still read (``quality_table``)
FORMAT_VERSION = 2
#: PSNR reported for identical images (JSON has no infinity)
PSNR_CAP = 100.0


# ---------------------------------------------------------------------------------------------- location
def model_path_of(pipeline: Any) -> str | None:
    """The folder or hub id a diffusers pipeline was loaded from."""
    return getattr(pipeline, "name_or_path", None) or pipeline.config.get("_name_or_path")


def user_calibration_dir() -> Path:
    root = os.environ.get("DITSERVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ditserve")
    return Path(root) / "calibration"


def user_calibration_file(model_path: str) -> Path:
    """One file per model id; local folders are keyed by their absolute path."""
    model_id = str(Path(model_path).resolve()) if Path(model_path).exists() else model_path
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_id.strip("/"))[-80:]
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:12]
    return user_calibration_dir() / f"{readable}-{digest}.json"


def calibration_candidates(model_path: str) -> list[Path]:
    folder = Path(model_path)
    local = [folder / CALIBRATION_FILE] if folder.is_dir() else []
    return [*local, user_calibration_file(model_path)]


def load_calibration(model_path: str | None) -> dict[str, Any] | None:
    if model_path is None:
        return None
    for candidate in calibration_candidates(model_path):
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            data["_file"] = str(candidate)
            return data
    return None


def save_calibration(model_path: str, data: Mapping[str, Any]) -> Path:
    folder = Path(model_path)
    target = folder / CALIBRATION_FILE
    if not (folder.is_dir() and os.access(folder, os.W_OK)):
        target = user_calibration_file(model_path)
        target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=1) + "\n")
    return target


# ---------------------------------------------------------------------------------------------- targets
def resolve_target(model_path: str | None, backend: str, target_psnr: float,
                   fixed: Mapping[str, Any]) -> Resolution:
    """The config of the fastest calibrated point whose worst prompt met ``target_psnr`` (see ``choose_point``)."""
    calibration = load_calibration(model_path) or {}
    table = quality_table(calibration, backend) if calibration else None
    if table is None or not table.points:
        raise CacheConfigError(
            f"a quality target needs the quality table of {backend} for {model_path}, and there is none: run "
            f"'ditserve calibrate {model_path}' first, or set the cache's options directly", param="target_psnr")
    chosen = choose_point(table, target_psnr, fixed)
    return Resolution(target_psnr, dict(chosen.config), chosen.worst_db, chosen.psnr_mean, chosen.work,
                      calibration.get("_file"))


# ---------------------------------------------------------------------------------------------- recording
@dataclass
class StepSeries:
    """What an uncached run shows for one (branch, request): one entry per step."""

    input_change: list[float | None] = field(default_factory=list)
    output_change: list[float | None] = field(default_factory=list)
    residual_norm: list[float] = field(default_factory=list)
    #: the request's step index of each ``residual_norm`` (a model with two experts runs each on a share of
    #: the steps) and the request's step count
    steps: list[int] = field(default_factory=list)
    num_steps: int = 0
    previous_input: torch.Tensor | None = None
    previous_output: torch.Tensor | None = None


def mean_token_norm(residual: torch.Tensor) -> float:
    """MagCache's magnitude: the L2 norm over channels, averaged over tokens and rows."""
    return float(residual.float().norm(dim=-1).mean())


class RecordingPolicy(SkipPolicy):
    """Never skips; records the series calibration fits on."""

    needs_modulated_input = True

    def new_state(self, label: str) -> StepSeries:
        return StepSeries()

    def decide(self, state: StepSeries, step: int, num_steps: int, modulated: torch.Tensor | None) -> Decision:
        assert modulated is not None
        state.num_steps = num_steps
        previous, state.previous_input = state.previous_input, modulated
        state.input_change.append(None if previous is None else relative_l1(modulated, previous))
        return Decision(False, None, "calibration")

    def observe_computed(self, state: StepSeries, step: int, blocks_in: torch.Tensor, blocks_out: torch.Tensor) -> None:
        previous, state.previous_output = state.previous_output, blocks_out
        state.output_change.append(None if previous is None else relative_l1(blocks_out, previous))
        state.residual_norm.append(mean_token_norm(blocks_out - blocks_in))
        state.steps.append(step)


# ---------------------------------------------------------------------------------------------- fitting
def fit_rescale_polynomial(series: Iterable[StepSeries], degree: int = 4) -> dict[str, Any]:
    """TeaCache's polynomial: block-loop output change as a function of modulated-input change."""
    xs, ys = [], []
    for s in series:
        for x, y in zip(s.input_change, s.output_change, strict=True):
            if x is not None and y is not None:
                xs.append(x)
                ys.append(y)
    if len(xs) < 3:
        raise CacheConfigError("calibration needs at least 3 steps after the first to fit TeaCache",
                               param="num_inference_steps")
    x, y = np.asarray(xs), np.asarray(ys)
    degree = min(degree, len(xs) - 1)
    coefficients = np.polyfit(x, y, degree)
    predicted = np.polyval(coefficients, x)
    residual_ss = float(((y - predicted) ** 2).sum())
    total_ss = float(((y - y.mean()) ** 2).sum())
    return {"coefficients": [float(c) for c in coefficients],
            "fit": {"degree": degree, "points": len(xs), "r2": 1.0 - residual_ss / total_ss if total_ss else 1.0,
                    "rmse": math.sqrt(residual_ss / len(xs)), "input_change_range": [float(x.min()), float(x.max())]}}


def magnitude_ratios(by_branch: Mapping[str, Sequence[StepSeries]]) -> dict[str, Any]:
    """MagCache's ratios per branch: mean over prompts of |residual_t| / |residual_t-1|, with their spread.

    Each list has one ratio per step of the request, whichever transformer ran it: a branch of one expert of a
    two-expert model (Wan2.2 A14B: "cond" of the high-noise one, "transformer_2:cond" of the low-noise one) holds
    1.0 at the steps the other runs and at its own first step (there is nothing of its own to compare with), so
    the policy of each expert indexes its ratios by the request's step, as for a single transformer."""
    ratios: dict[str, list[float]] = {}
    spread: dict[str, float] = {}
    for branch, series in by_branch.items():
        per_prompt = np.ones((len(series), series[0].num_steps))
        for row, s in zip(per_prompt, series, strict=True):
            for i in range(1, len(s.steps)):
                if s.steps[i] == s.steps[i - 1] + 1:
                    row[s.steps[i]] = s.residual_norm[i] / max(s.residual_norm[i - 1], 1e-12)
        ran = sorted({step for s in series for step in s.steps[1:]})
        ratios[branch] = [float(r) for r in per_prompt.mean(axis=0)]
        spread[branch] = float(per_prompt[:, ran].std(axis=0).mean()) if ran else 0.0
    return {"mag_ratios": ratios, "fit": {"mean_std_across_prompts": spread}}


def psnr(reference: np.ndarray, image: np.ndarray) -> float:
    """PSNR in dB of two uint8 images, capped for identical ones."""
    mse = float(((reference.astype(np.float64) - image.astype(np.float64)) ** 2).mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / mse))
