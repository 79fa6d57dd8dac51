"""MagCache (Ma et al., "MagCache: Fast Video Generation with Magnitude-Aware Cache"), our own.

The ratio of residual magnitudes between consecutive steps is nearly the same for every prompt of a model, so
it is measured once (``mag_ratios``, by ``ditserve calibrate``). Per step and state key the product of the
ratios since the last computed step drifts from 1; the accumulated drift ``sum |1 - product|`` is the error
of reusing the stored residual. Skip while that error is under ``magcache_thresh`` and at most
``magcache_K`` steps in a row; the first ``retention_ratio`` of the steps always run.

``magcache_K_growth`` (ours; 1: the paper's constant K) multiplies the cap on skips in a row by itself after
each step computed past the retention: ``floor(K * growth**j)`` after the j-th. Early steps decide the picture
and late ones hardly change it, so computed steps spaced ever wider keep quality that evenly spaced ones lose:
on the demo (50 steps, CFG 3, bench prompts) 7 computed steps at K 1, growth 1.75 (steps 0 2 4 8 14 24 41)
keep the worst prompt at 37.6 dB, where the best constant cap (K 6, retention 0.1) needs 11 for 37.3 dB
(docs/benchmarks/cpu-2026-12-07-growth).

Guidance branches measured apart (cond, uncond) are accumulated apart, but every branch of a request decides on
the largest of their errors, so all branches skip and compute at the same steps. The guided output is
``uncond + scale * (cond - uncond)``: branches reusing residuals of different steps put a step's worth of drift
into that difference, times the scale. On the demo (true CFG 3, 50 steps, 0.24/K6/r0.1) branches out of step
lost 3 dB on the worst prompt (34.3 against 37.5 dB in step).

A model with two experts (Wan2.2 A14B) has ratios per expert, one per step of the request (calibration measures
each on the steps it runs), and each expert's policy reads its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ditserve.cache.base import integer_in, number_in
from ditserve.cache.hooks import Decision, SkipPolicy
from ditserve.cache.residual_backend import TRANSFORMER_PREFIX, ResidualCacheBackend
from ditserve.cache.search import Knob
from ditserve.cache.spec import CacheSpec
from ditserve.errors import CacheConfigError, InvalidTypeError

#: ``mag_ratios`` as the policy uses it: one sequence per branch ("*" = any branch)
BranchRatios = dict[str, list[float]]


def nearest_resample(ratios: Sequence[float], length: int) -> list[float]:
    """Ratios measured over n steps mapped to ``length`` steps by nearest position (as MagCache does)."""
    if length == 1:
        return [ratios[-1]]
    scale = (len(ratios) - 1) / (length - 1)
    return [ratios[round(i * scale)] for i in range(length)]


def transformer_ratios(ratios: BranchRatios, transformer_name: str) -> BranchRatios:
    """The ratios of the transformer at attribute ``transformer_name``, by branch. Calibration prefixes a further
    transformer's branches with its name ("transformer_2:cond": Wan2.2 A14B's low-noise expert, whose states are
    labelled "cond" like the first's); ratios given without a prefix serve every transformer that has none of
    its own."""
    prefix = f"{transformer_name}{TRANSFORMER_PREFIX}"
    own = {branch.removeprefix(prefix): r for branch, r in ratios.items() if branch.startswith(prefix)}
    return own or {branch: r for branch, r in ratios.items() if TRANSFORMER_PREFIX not in branch} or ratios


def check_mag_ratios(name: str, value: Any) -> BranchRatios:
    """A list of ratios (every branch) or {"cond": [...], "uncond": [...]}."""
    per_branch = value if isinstance(value, Mapping) else {"*": value}
    checked: BranchRatios = {}
    for branch, ratios in per_branch.items():
        if not isinstance(ratios, (list, tuple)) or len(ratios) < 2 or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in ratios):
            raise InvalidTypeError(f"cache_config[{name!r}] must be a list of at least 2 positive numbers, or a "
                                   "dict of such lists per guidance branch", param=name)
        checked[str(branch)] = [float(r) for r in ratios]
    return checked


@dataclass
class MagCacheState:
    #: product of the ratios since the last computed step, per measured branch
    accumulated_ratio: dict[str, float] = field(default_factory=dict)
    #: sum of ``|1 - product|`` since the last computed step, per measured branch
    accumulated_error: dict[str, float] = field(default_factory=dict)
    skipped_in_row: int = 0
    #: steps computed since the retention ended (the cap on skips in a row has grown this many times)
    computed_after_retention: int = 0

    def restart(self) -> None:
        self.accumulated_ratio.clear()
        self.accumulated_error.clear()
        self.skipped_in_row = 0


class MagCachePolicy(SkipPolicy):
    def __init__(self, threshold: float, max_skips: int, retention_ratio: float, ratios: BranchRatios,
                 growth: float = 1.0) -> None:
        self.threshold = threshold
        self.max_skips = max_skips
        self.growth = growth
        self.retention_ratio = retention_ratio
        self.ratios = ratios
        self._resampled: dict[int, BranchRatios] = {}

    def new_state(self, label: str) -> MagCacheState:
        # every branch's state sees every branch's ratios: the label does not matter
        return MagCacheState()

    def ratios_at(self, num_steps: int) -> BranchRatios:
        """Each measured branch's ratios over ``num_steps`` steps."""
        if num_steps not in self._resampled:
            self._resampled[num_steps] = {branch: nearest_resample(ratios, num_steps)
                                          for branch, ratios in self.ratios.items()}
        return self._resampled[num_steps]

    def skip_cap(self, computed_after_retention: int, num_steps: int) -> int:
        """Skips allowed in a row after the given number of steps computed past the retention."""
        grown = float(self.max_skips)
        # grown once per computed step until it reaches the step count: growth ** j itself overflows a float
        # after a long run of computes (growth 10 with a threshold that computes every step of 1000)
        for _ in range(computed_after_retention):
            if self.growth == 1.0 or not 0 < grown < num_steps:
                break
            grown *= self.growth
        # the epsilon keeps products like 1.6 * 1.25 from flooring a whole number below
        return math.floor(min(grown, num_steps) + 1e-9)

    def decide(self, state: MagCacheState, step: int, num_steps: int, modulated: torch.Tensor | None) -> Decision:
        if step == 0 or step < int(self.retention_ratio * num_steps):
            state.restart()
            state.computed_after_retention = 0
            return Decision(False, None, "retention")
        for branch, ratios in self.ratios_at(num_steps).items():
            state.accumulated_ratio[branch] = state.accumulated_ratio.get(branch, 1.0) * ratios[step]
            state.accumulated_error[branch] = (state.accumulated_error.get(branch, 0.0)
                                               + abs(1.0 - state.accumulated_ratio[branch]))
        error = max(state.accumulated_error.values())
        state.skipped_in_row += 1
        if error < self.threshold and state.skipped_in_row <= self.skip_cap(state.computed_after_retention, num_steps):
            return Decision(True, error, "under threshold")
        reason = "threshold reached" if error >= self.threshold else "max consecutive skips"
        self.computed_instead(state)
        return Decision(False, error, reason)

    def computed_instead(self, state: MagCacheState) -> None:
        state.restart()
        state.computed_after_retention += 1


class MagCacheBackend(ResidualCacheBackend):
    name = "mag_cache"
    main_knob = "magcache_thresh"
    defaults = {"magcache_thresh": 0.06, "magcache_K": 3, "magcache_K_growth": 1.0, "retention_ratio": 0.2,
                "mag_ratios": None}
    checks = {"magcache_thresh": number_in(0.0, 100.0), "magcache_K": integer_in(0, 1000),
              "magcache_K_growth": number_in(1.0, 10.0), "retention_ratio": number_in(0.0, 1.0),
              "mag_ratios": check_mag_ratios}
    # K and the retention share cap the skipping whatever the threshold allows (3 and 0.2 stop at 40 % of the
    # work), so the search moves them too. The top rungs let K alone space the computed steps: on the demo the
    # late steps' ratios (0.90-0.95) still reach 0.8 within 6 skips, and computing them there bought no PSNR
    # (0.8/K6/r0.1: work 0.24 at 37.3 dB worst; diffusers' ratios, closer to 1 there, skip them: 0.22, 37.3 dB)
    # With K growing, gaps of 10-17 steps accumulate errors of 4-8 on the demo: rungs 4 and 8 let the cap alone
    # space them (at 2.0 K 1 growth 1.75 computed step 38 too, 8 steps for the 7 of the cap alone at equal PSNR).
    search_knobs = (Knob("magcache_thresh", (0.01, 0.02, 0.03, 0.06, 0.09, 0.12, 0.18, 0.24, 0.36, 0.5, 0.8, 1.2,
                                             2.0, 4.0, 8.0)),
                    Knob("magcache_K", (1, 2, 3, 4, 6, 8, 12, 16)),
                    Knob("magcache_K_growth", (1.0, 1.25, 1.5, 1.75, 2.0)),
                    # finer under 0.1, where each retained step counts: 2, 3, 4 and 5 of 50 steps
                    Knob("retention_ratio", (0.0, 0.04, 0.06, 0.08, 0.1, 0.2, 0.3)))
    search_seeds = (0.03, 0.06, 0.12, 0.24)
    # A growing cap alone (threshold at its top rung): from the defaults the search needs some ten one-step moves
    # to get there, and on the demo spent its budget of 100 on the way (K 1 and growth 1.5-2 make its front)
    search_start_points = ({"magcache_thresh": 8.0, "magcache_K": 1, "magcache_K_growth": 1.5,
                            "retention_ratio": 0.1},)

    def configure(self, spec: CacheSpec, calibration: dict[str, Any] | None) -> None:
        measured = (calibration or {}).get("mag_cache", {}).get("mag_ratios")
        if "mag_ratios" in self.user_options:
            source = "cache_config"
        elif measured:
            self.config["mag_ratios"] = check_mag_ratios("mag_ratios", measured)
            source = "calibration file (ditserve calibrate)"
        elif spec.mag_ratios:
            self.config["mag_ratios"], source = {"*": list(spec.mag_ratios)}, spec.mag_ratios_source
        else:
            raise CacheConfigError(
                f"mag_cache needs magnitude ratios for {spec.transformer_class} and none are known for this model: "
                "run 'ditserve calibrate MODEL' or pass cache_config={'mag_ratios': [...]}", param="mag_ratios")
        self.config["mag_ratios_source"] = source

    def planned_decisions(self, pipeline: Any, adapter: Any, num_steps: int) -> dict[str, list[bool]]:
        # the policy reads only the step and the ratios, and every branch decides on all of them
        transformers, _ = self._resolve(pipeline, adapter)
        plan = {}
        for name, _ in transformers:
            policy = self.make_policy(name)
            state = policy.new_state("cond")
            plan[name] = [policy.decide(state, step, num_steps, None).skip for step in range(num_steps)]
        return plan

    def make_policy(self, transformer_name: str) -> MagCachePolicy:
        c = self.config
        return MagCachePolicy(c["magcache_thresh"], c["magcache_K"], c["retention_ratio"],
                              transformer_ratios(c["mag_ratios"], transformer_name), c["magcache_K_growth"])
