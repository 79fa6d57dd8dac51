"""The lifecycle shared by the residual-reuse caches (TeaCache, MagCache): enable, refresh, statistics, disable."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import torch

from ditserve.cache.base import CacheBackend
from ditserve.cache.calibration import load_calibration, model_path_of
from ditserve.cache.hooks import ResidualReuseController, SkipPolicy, install_loop_hooks, remove_loop_hooks
from ditserve.cache.spec import CacheSpec, cache_spec_for
from ditserve.errors import CacheConfigError


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
        self._num_steps = 0

    @abstractmethod
    def configure(self, spec: CacheSpec, calibration: dict[str, Any] | None) -> None:
        """Fill the options the user left open from the model's calibration or the family's defaults."""

    @abstractmethod
    def make_policy(self) -> SkipPolicy:
        """The skip policy built from the resolved config."""

    def enable(self, pipeline: Any, adapter: Any) -> None:
        transformers = denoising_transformers(pipeline, adapter)
        specs = [cache_spec_for(module, self.name) for _, module in transformers]
        model_path = model_path_of(pipeline)
        self.resolve_quality_target(model_path)
        # one config for the model: the first transformer's family knowledge (Wan2.2's two experts share it)
        self.configure(specs[0], load_calibration(model_path))
        for (name, module), spec in zip(transformers, specs, strict=True):
            controller = ResidualReuseController(name, spec, self.make_policy())
            install_loop_hooks(module, controller)
            self._controllers.append((module, controller))
        self.enabled = True

    def refresh(self, pipeline: Any, num_inference_steps: int, request_ids: Sequence[str] = ()) -> None:
        self._num_steps = num_inference_steps
        for _, controller in self._controllers:
            controller.reset()

    def disable(self, pipeline: Any) -> None:
        for module, controller in self._controllers:
            remove_loop_hooks(module, controller.spec)
        self._controllers.clear()
        self.enabled = False

    def block_loop_runs(self) -> int:
        """Transformer calls of the last batch whose block bodies actually ran."""
        return sum(controller.block_loop_runs for _, controller in self._controllers)

    def _collect_stats(self, request_id: str) -> dict[str, Any]:
        branches: dict[str, Any] = {}
        for name, controller in ((c.transformer_name, c) for _, c in self._controllers):
            for label, record in controller.request_records(request_id).items():
                computed = sum(d["decision"] == "compute" for d in record.decisions)
                full_label = label if name == "transformer" else f"{name}:{label}"
                branches[full_label] = {"computed": computed, "skipped": len(record.decisions) - computed,
                                        "decisions": list(record.decisions)}
        computed = sum(b["computed"] for b in branches.values())
        skipped = sum(b["skipped"] for b in branches.values())
        total = computed + skipped
        return {"num_steps": self._num_steps, "computed_steps": computed, "skipped_steps": skipped,
                "work_fraction": computed / total if total else 1.0, "branches": branches}
