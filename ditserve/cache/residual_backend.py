"""The lifecycle shared by the residual-reuse caches (TeaCache, MagCache): enable, start and finish each request,
statistics, disable."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ditserve.cache.base import CacheBackend
from ditserve.cache.calibration import load_calibration, model_path_of
from ditserve.cache.hooks import (
    ForecastOrder,
    ResidualReuseController,
    SkipPolicy,
    install_loop_hooks,
    remove_loop_hooks,
)
from ditserve.cache.spec import CacheSpec, cache_spec_for
from ditserve.errors import CacheConfigError

#: the option of the backends that may forecast a skipped step's residual (``ForecastOrder``)
FORECAST_KNOB = "forecast_order"


def check_forecast_order(name: str, value: Any) -> int:
    """0 (reuse the last residual) or 1 (extrapolate from the last two), as a plain int (JSON-friendly)."""
    allowed = {order.value: order.name.lower() for order in ForecastOrder}
    # True and 1.0 compare equal to 1: only an int is taken
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise CacheConfigError(f"cache_config[{name!r}]={value!r} is not allowed; choose one of {allowed}",
                               param=name)
    return value


#: what statistics and calibration put between a further transformer's name and its branch label
#: ("transformer_2:cond"); the first transformer's branches carry no prefix
TRANSFORMER_PREFIX = ":"


def branch_label(transformer_name: str, label: str) -> str:
    """How statistics and calibration name a branch of the transformer at attribute ``transformer_name``."""
    return label if transformer_name == "transformer" else f"{transformer_name}{TRANSFORMER_PREFIX}{label}"


def denoising_transformers(pipeline: Any, adapter: Any) -> list[tuple[str, torch.nn.Module]]:
    """(attribute name, module) of each transformer the adapter calls, or an error naming the pipeline."""
    found = [(name, getattr(pipeline, name, None)) for name in adapter.transformer_names]
    found = [(name, module) for name, module in found if isinstance(module, torch.nn.Module)]
    if not found:
        raise CacheConfigError(f"{type(pipeline).__name__} has no transformer to cache "
                               f"(looked for {list(adapter.transformer_names)})", param="cache_backend")
    return found


class ResidualCacheBackend(CacheBackend):
    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._controllers: list[tuple[torch.nn.Module, ResidualReuseController]] = []
        #: wraps each transformer's skip policy before ``enable`` installs it (multi-device runs make the
        #: decisions agree across ranks)
        self.policy_wrapper: Callable[[SkipPolicy], SkipPolicy] | None = None
        #: step count of each running request
        self._num_steps: dict[str, int] = {}

    @abstractmethod
    def configure(self, spec: CacheSpec, calibration: dict[str, Any] | None) -> None:
        """Fill the options the user left open from the model's calibration or the family's defaults."""

    @abstractmethod
    def make_policy(self, transformer_name: str) -> SkipPolicy:
        """The skip policy of the transformer at attribute ``transformer_name``, built from the resolved config."""

    def enable(self, pipeline: Any, adapter: Any) -> None:
        if not adapter.reports_steps:
            raise CacheConfigError(
                f"cache_backend={self.name!r} needs each denoising step's index, and {adapter.pipeline_class_name} "
                "runs its own loop without a step callback (callback_on_step_end)", param="cache_backend")
        transformers, specs = self._resolve(pipeline, adapter)
        for (name, module), spec in zip(transformers, specs, strict=True):
            policy = self.make_policy(name)
            if self.policy_wrapper is not None:
                policy = self.policy_wrapper(policy)
            controller = ResidualReuseController(
                name, spec, policy, ForecastOrder(self.config.get(FORECAST_KNOB, ForecastOrder.REUSE)))
            install_loop_hooks(module, controller)
            self._controllers.append((module, controller))
        self.enabled = True

    def _resolve(self, pipeline: Any, adapter: Any) -> tuple[list[tuple[str, torch.nn.Module]], list[CacheSpec]]:
        """The transformers to cache with their specs, the config completed from the model's calibration."""
        transformers = denoising_transformers(pipeline, adapter)
        specs = [cache_spec_for(module, self.name) for _, module in transformers]
        model_path = model_path_of(pipeline)
        self.resolve_quality_target(model_path)
        # one config for the model: the first transformer's family knowledge (Wan2.2's two experts share it)
        self.configure(specs[0], load_calibration(model_path))
        return transformers, specs

    def start(self, pipeline: Any, request_ids: Sequence[str], num_inference_steps: int) -> None:
        for request_id in request_ids:
            self._num_steps[request_id] = num_inference_steps
            for _, controller in self._controllers:
                controller.forget(request_id)

    def finish(self, request_id: str) -> None:
        self._num_steps.pop(request_id, None)
        for _, controller in self._controllers:
            controller.forget(request_id)

    def recover(self, pipeline: Any) -> None:
        # step counts stay: requests that go on after a retried step keep reporting theirs
        for _, controller in self._controllers:
            controller.reset()

    def disable(self, pipeline: Any) -> None:
        for module, controller in self._controllers:
            remove_loop_hooks(module, controller.spec)
        self._controllers.clear()
        self.enabled = False

    def _collect_stats(self, request_id: str) -> dict[str, Any]:
        branches: dict[str, Any] = {}
        for name, controller in ((c.transformer_name, c) for _, c in self._controllers):
            for label, record in controller.request_records(request_id).items():
                computed = sum(d["decision"] == "compute" for d in record.decisions)
                full_label = branch_label(name, label)
                branches[full_label] = {"computed": computed, "skipped": len(record.decisions) - computed,
                                        "forecast": sum(d["forecast"] for d in record.decisions),
                                        "decisions": list(record.decisions)}
        computed = sum(b["computed"] for b in branches.values())
        skipped = sum(b["skipped"] for b in branches.values())
        total = computed + skipped
        # skips that added an extrapolated residual rather than the last one as it was
        forecast = sum(b["forecast"] for b in branches.values())
        return {"num_steps": self._num_steps.get(request_id, 0), "computed_steps": computed, "skipped_steps": skipped,
                "forecast_steps": forecast, "work_fraction": computed / total if total else 1.0,
                "branches": branches}
