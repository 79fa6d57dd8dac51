"""TeaCache (Liu et al., "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model"), our own.

Per step and state key: the relative L1 change of the first block's modulated input since the previous step,
rescaled by a polynomial fitted per model (output change against input change), is accumulated; while the
sum stays under ``rel_l1_thresh`` the block loop is skipped and the stored residual reused; when it reaches
the threshold the loop runs and the sum restarts. The first and last steps always run. With ``forecast_order``
1 a skipped step extrapolates the residual from the last two computed ones instead (``ditserve.cache.hooks``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ditserve.cache.base import number_in, number_list
from ditserve.cache.hooks import Decision, ForecastOrder, SkipPolicy, relative_l1
from ditserve.cache.residual_backend import FORECAST_KNOB, ResidualCacheBackend, check_forecast_order
from ditserve.cache.search import Knob
from ditserve.cache.spec import CacheSpec, polynomial

logger = logging.getLogger(__name__)

#: without fitted coefficients the raw relative change is used as is (and a warning says so)
IDENTITY_COEFFICIENTS = (1.0, 0.0)


@dataclass
class TeaCacheState:
    previous_input: torch.Tensor | None = None
    accumulated: float = 0.0


class TeaCachePolicy(SkipPolicy):
    needs_modulated_input = True

    def __init__(self, threshold: float, coefficients: tuple[float, ...]) -> None:
        self.threshold = threshold
        self.coefficients = coefficients

    def new_state(self, label: str) -> TeaCacheState:
        return TeaCacheState()

    def decide(self, state: TeaCacheState, step: int, num_steps: int, modulated: torch.Tensor | None) -> Decision:
        assert modulated is not None
        previous, state.previous_input = state.previous_input, modulated
        if previous is None or previous.shape != modulated.shape:
            state.accumulated = 0.0
            return Decision(False, None, "first step")
        # a negative rescaled change is an artifact of the polynomial fit, not a real change
        change = max(polynomial(self.coefficients, relative_l1(modulated, previous)), 0.0)
        if step >= num_steps - 1:
            state.accumulated = 0.0
            return Decision(False, change, "last step")
        state.accumulated += change
        if state.accumulated < self.threshold:
            return Decision(True, state.accumulated, "under threshold")
        distance, state.accumulated = state.accumulated, 0.0
        return Decision(False, distance, "threshold reached")

    def computed_instead(self, state: TeaCacheState) -> None:
        state.accumulated = 0.0


class TeaCacheBackend(ResidualCacheBackend):
    name = "tea_cache"
    main_knob = "rel_l1_thresh"
    defaults = {"rel_l1_thresh": 0.2, "coefficients": None, FORECAST_KNOB: ForecastOrder.REUSE.value}
    checks = {"rel_l1_thresh": number_in(0.0, 100.0), "coefficients": number_list,
              FORECAST_KNOB: check_forecast_order}
    # the threshold trades speed for quality, its rungs closer between 0.2 and 0.4 where the 30 dB presets
    # resolve (on the demo 0.25 and 0.3 lay 3.2 dB and 0.9x apart); a forecast errs less per skip where the
    # residual drifts smoothly, so on some model it may let a higher threshold keep the same quality (not on
    # the demo, whose residual bends in the first steps)
    search_knobs = (Knob("rel_l1_thresh", (0.03, 0.05, 0.07, 0.1, 0.13, 0.16, 0.2, 0.22, 0.25, 0.26, 0.28, 0.3, 0.35,
                                           0.4, 0.5, 0.6, 0.8)),
                    Knob(FORECAST_KNOB, tuple(order.value for order in ForecastOrder)))
    search_seeds = (0.05, 0.1, 0.2, 0.3, 0.4)

    def configure(self, spec: CacheSpec, calibration: dict[str, Any] | None) -> None:
        fitted = (calibration or {}).get("tea_cache", {}).get("coefficients")
        if "coefficients" in self.user_options:
            source = "cache_config"
        elif fitted:
            self.config["coefficients"], source = list(fitted), "calibration file (ditserve calibrate)"
        elif spec.tea_coefficients:
            self.config["coefficients"], source = list(spec.tea_coefficients), spec.tea_coefficients_source
        else:
            self.config["coefficients"] = list(IDENTITY_COEFFICIENTS)
            source = "none: raw relative L1 (uncalibrated)"
            logger.warning("tea_cache: no rescale coefficients for %s; thresholds apply to the raw change. "
                           "Run 'ditserve calibrate MODEL' for fitted coefficients and quality targets",
                           spec.transformer_class)
        self.config["coefficients_source"] = source

    def make_policy(self, transformer_name: str) -> TeaCachePolicy:
        return TeaCachePolicy(self.config["rel_l1_thresh"], tuple(self.config["coefficients"]))
