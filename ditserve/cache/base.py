"""The contract every cache method implements.

A backend is built from a name and a config (``ditserve.cache.selector``), enabled once on a pipeline,
started for each request that joins the running set, asked for its statistics when it leaves, then finished. A backend that cannot serve
the model raises ``CacheConfigError`` from ``enable`` (at ``Omni(...)``), never degrades to a silent no-op.

Config handling is shared: every backend declares its options with defaults and checks; unknown keys are an
error listing the allowed ones; ``target_psnr`` / ``quality`` are resolved against the model's calibration
table (``ditserve.cache.quality_table``) to the fastest point of its front whose worst calibration prompt met
the target, which sets every knob the search moved (``search_knobs``) that the user did not give by hand.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from ditserve.cache.search import Knob
from ditserve.errors import CacheConfigError, InvalidTypeError, check_keys

logger = logging.getLogger(__name__)

#: a request with at least this many steps on which a cache skipped nothing is reported loudly
NO_SKIP_WARNING_MIN_STEPS = 20
#: named quality presets, as PSNR targets (dB) against the uncached output
QUALITY_PRESETS: dict[str, float] = {"high": 35.0, "balanced": 30.0, "fast": 25.0}
TARGET_KEYS = ("target_psnr", "quality")

#: an option checker: raises on a bad value, returns the normalized value
OptionCheck = Callable[[str, Any], Any]


def number_in(minimum: float, maximum: float) -> OptionCheck:
    def check(name: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidTypeError(f"cache_config[{name!r}] must be a number, got {type(value).__name__}",
                                   param=name)
        if not math.isfinite(value) or not minimum <= value <= maximum:
            raise CacheConfigError(f"cache_config[{name!r}]={value} must be in [{minimum}, {maximum}]", param=name)
        return float(value)

    return check


def integer_in(minimum: int, maximum: int) -> OptionCheck:
    def check(name: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidTypeError(f"cache_config[{name!r}] must be an integer, got {type(value).__name__}",
                                   param=name)
        if not minimum <= value <= maximum:
            raise CacheConfigError(f"cache_config[{name!r}]={value} must be in [{minimum}, {maximum}]", param=name)
        return value

    return check


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidTypeError(f"cache_config[{name!r}] must be true or false, got {value!r}", param=name)
    return value


def one_of(*allowed: Any) -> OptionCheck:
    def check(name: str, value: Any) -> Any:
        if value not in allowed:
            raise CacheConfigError(f"cache_config[{name!r}]={value!r} is not allowed; choose one of {list(allowed)}",
                                   param=name)
        return value

    return check


def number_list(name: str, value: Any) -> list[float]:
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise InvalidTypeError(f"cache_config[{name!r}] must be a non-empty list of numbers", param=name)
    return [float(v) for v in value]


def check_target(config: Mapping[str, Any]) -> float | None:
    """The PSNR target asked for through ``target_psnr`` or ``quality``, or None."""
    if "target_psnr" in config and "quality" in config:
        raise CacheConfigError("give either target_psnr or quality, not both", param="quality")
    if "quality" in config:
        one_of(*QUALITY_PRESETS)("quality", config["quality"])
        return QUALITY_PRESETS[config["quality"]]
    if "target_psnr" in config:
        return number_in(1.0, 100.0)("target_psnr", config["target_psnr"])
    return None


class CacheBackend(ABC):
    #: the ``cache_backend`` name users pass
    name: ClassVar[str] = ""
    #: option name -> default (None: filled when the backend is enabled, from the model)
    defaults: ClassVar[dict[str, Any]] = {}
    #: option name -> check
    checks: ClassVar[dict[str, OptionCheck]] = {}
    #: the option a quality target tunes first (the threshold every skip decision compares with)
    main_knob: ClassVar[str] = ""
    #: the options ``ditserve calibrate`` searches (main knob first), each with its ladder of values; a quality
    #: target sets all of them from the point it resolves to
    search_knobs: ClassVar[tuple[Knob, ...]] = ()
    #: main-knob values the search starts from (the other knobs at their defaults)
    search_seeds: ClassVar[tuple[float, ...]] = ()
    #: further starting points, each the knobs it moves off the defaults (a region the one-step moves from the
    #: defaults reach only after many rounds)
    search_start_points: ClassVar[tuple[dict[str, Any], ...]] = ()
    #: False for backends that never skip by design (calibration's recorder): no "skipped nothing" warning
    expected_to_skip: ClassVar[bool] = True
    #: True when skip decisions and state are kept per request (a request may join or leave a running batch
    #: at any step); False when the library decides per transformer call for the whole batch, so requests
    #: share a running batch only as a cohort that starts and steps together
    decides_per_request: ClassVar[bool] = True

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        given = dict(config or {})
        check_keys(f"cache_config of {self.name}", given.keys(), [*self.defaults, *TARGET_KEYS])
        self.target_psnr = check_target(given)
        options = {k: v for k, v in given.items() if k not in TARGET_KEYS}
        if self.target_psnr is not None and self.main_knob in options:
            raise CacheConfigError(
                f"{self.main_knob} and a quality target both set it: give one of them", param=self.main_knob)
        #: the options the user gave (checked), before the model fills the rest
        self.user_options = {k: self.checks[k](k, v) if k in self.checks else v for k, v in options.items()}
        #: every option with its value in effect; complete after ``enable``
        self.config: dict[str, Any] = {**self.defaults, **self.user_options}
        #: how a quality target was resolved (None without one)
        self.resolution: dict[str, Any] | None = None
        self.enabled = False

    @abstractmethod
    def enable(self, pipeline: Any, adapter: Any) -> None:
        """Apply the method to the pipeline's transformer(s). Called once, at start-up."""

    def planned_decisions(self, pipeline: Any, adapter: Any, num_steps: int) -> dict[str, list[bool]] | None:
        """Each transformer's skip decision at every step, where they follow from the config and the model alone
        (not from the prompt), so calibration measures configs that decide alike once; None otherwise."""
        return None

    @abstractmethod
    def start(self, pipeline: Any, request_ids: Sequence[str], num_inference_steps: int) -> None:
        """Fresh state for requests that join the running set (``num_inference_steps`` each). A backend that
        does not decide per request is only ever started for a whole cohort, into an empty running set."""

    def finish(self, request_id: str) -> None:
        """A request left the running set and its statistics were read: drop what was kept for it."""
        return None

    @abstractmethod
    def _collect_stats(self, request_id: str) -> dict[str, Any]:
        """This backend's statistics of one request: at least ``num_steps``, ``computed_steps`` and
        ``skipped_steps`` (summed over guidance branches)."""

    def request_stats(self, request_id: str) -> dict[str, Any]:
        """Statistics of one running or just finished request, with a warning when a long run skipped nothing."""
        stats = {"backend": self.name, "config": self.public_config(), **self._collect_stats(request_id)}
        if self.resolution is not None:
            stats["resolved_from"] = self.resolution
        long_run = stats.get("num_steps", 0) >= NO_SKIP_WARNING_MIN_STEPS
        if self.expected_to_skip and long_run and stats.get("skipped_steps", 0) == 0:
            stats["warning"] = (f"{self.name} was enabled but skipped nothing in {stats['num_steps']} steps: "
                                f"the setting is too strict for this model (see the distances in 'branches'); "
                                f"raise {self.main_knob} or run 'ditserve calibrate'")
            logger.warning("request %s: %s", request_id, stats["warning"])
        return stats

    def public_config(self) -> dict[str, Any]:
        """The config in effect, as JSON-friendly values (long per-step lists are summarized)."""
        shown = {}
        for key, value in self.config.items():
            if isinstance(value, (list, tuple)) and len(value) > 8:
                shown[key] = f"<{len(value)} values>"
            elif isinstance(value, dict):
                shown[key] = {k: f"<{len(v)} values>" if isinstance(v, (list, tuple)) else v for k, v in value.items()}
            else:
                shown[key] = value
        return shown

    def resolve_quality_target(self, model_path: str | None) -> None:
        """Set the searched knobs from the model's calibration table when a quality target was asked for; the
        knobs the user gave stay as given and restrict the choice to points measured with them."""
        if self.target_psnr is None:
            return
        from ditserve.cache.calibration import resolve_target

        resolution = resolve_target(model_path, self.name, self.target_psnr, self.user_options)
        for key, value in resolution.config.items():
            if key not in self.user_options:
                self.config[key] = self.checks[key](key, value) if key in self.checks else value
        self.resolution = resolution.to_stats()

    @abstractmethod
    def recover(self, pipeline: Any) -> None:
        """After a step raised: drop every half-updated state so the next requests start clean."""

    def disable(self, pipeline: Any) -> None:
        """Remove the method from the pipeline (on close)."""
        self.enabled = False

    def is_enabled(self) -> bool:
        return self.enabled
