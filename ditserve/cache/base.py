"""The contract every cache method implements.

A backend is built from a name and a config (``ditserve.cache.selector``), enabled once on a pipeline,
refreshed before every batch, and asked for each request's statistics after it. A backend that cannot serve
the model raises ``CacheConfigError`` from ``enable`` (at ``Omni(...)``), never degrades to a silent no-op.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar


class CacheBackend(ABC):
    #: the ``cache_backend`` name users pass
    name: ClassVar[str] = ""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        self.config: dict[str, Any] = dict(config or {})
        self.enabled = False

    @abstractmethod
    def enable(self, pipeline: Any, adapter: Any) -> None:
        """Apply the method to the pipeline's transformer(s). Called once, at start-up."""

    @abstractmethod
    def refresh(self, pipeline: Any, num_inference_steps: int, request_ids: Sequence[str] = ()) -> None:
        """Clear all state before a batch runs: nothing leaks from one request to the next."""

    @abstractmethod
    def request_stats(self, request_id: str) -> dict[str, Any]:
        """Statistics of one request of the last batch: backend, computed/skipped steps, decisions."""

    def disable(self, pipeline: Any) -> None:
        """Remove the method from the pipeline (after a failure, or on close)."""
        self.enabled = False

    def is_enabled(self) -> bool:
        return self.enabled
