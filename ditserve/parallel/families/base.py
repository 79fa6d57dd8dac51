"""What a family tells the parallel runner: how many attention heads its transformer has, how many tokens a
request shards, and how to install sequence parallelism on its transformer."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.parallel.topology import ParallelTopology


class SequenceParallelPlan(ABC):
    #: ``model_index.json`` ``_class_name`` values this plan serves
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def attention_heads(self, transformer: torch.nn.Module) -> int:
        """Heads of the transformer's sharded attention (Ulysses splits them)."""

    @abstractmethod
    def sharded_tokens(self, adapter: Any, params: OmniDiffusionSamplingParams) -> int:
        """How many tokens of a request are split over the sequence-parallel ranks."""

    @abstractmethod
    def install(self, transformer: torch.nn.Module, topology: ParallelTopology) -> None:
        """Shard the inputs, replace the attention processors, gather the output."""
