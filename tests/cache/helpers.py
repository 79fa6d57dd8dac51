"""Helpers of the cache tests: count the transformer work that really ran, read outputs as arrays."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from ditserve.cache.spec import cache_spec_for

#: inner modules that only run when a block's body runs (a hook on the block itself fires even when skipped)
WORK_MODULE_NAMES = ("attn", "attention", "ff", "mlp", "feed_forward")


class WorkCounter:
    def __init__(self) -> None:
        self.calls = 0
        #: batch rows those calls ran on (a sub-batch counts its own rows)
        self.rows = 0

    def __call__(self, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.calls += 1
        self.rows += args[0].shape[0]


@contextmanager
def count_block_work(transformer: torch.nn.Module, backend_name: str = "tea_cache") -> Iterator[WorkCounter]:
    """Forward pre-hooks on every attention / MLP Linear inside the transformer's cached blocks."""
    counter = WorkCounter()
    handles = []
    for block, _ in cache_spec_for(transformer, backend_name).blocks(transformer):
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear) and any(part in name for part in WORK_MODULE_NAMES):
                handles.append(module.register_forward_pre_hook(counter))
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


def media(output) -> np.ndarray:
    return np.asarray(output.videos[0] if output.videos else output.images[0])
