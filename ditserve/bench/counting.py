"""Count the transformer-block work that really ran, whatever skipped it.

A hook on a block fires even when a cache reuses the block's output without running its body, so it
counts nothing useful. Instead a forward pre-hook sits on each block's first attention projection and on
its MLP's first projection: those only fire when the block's attention or MLP body really runs. The same
counter works on ditserve's pipeline and on a plain diffusers pipeline (hooks, cache-dit), so the compute
fraction of every system is measured the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

#: attribute names of a block's attention module, in order of preference
ATTENTION_NAMES = ("attn", "attn1", "attention", "self_attn")
#: attribute names of a block's first attention projection (fused or separate)
PROJECTION_NAMES = ("to_q", "to_qkv", "qkv", "q_proj")
#: attribute names of a block's MLP / feed-forward, in order of preference
MLP_NAMES = ("ff", "mlp", "feed_forward", "ffn", "proj_mlp")


def _first_linear(module: torch.nn.Module) -> torch.nn.Module | None:
    if isinstance(module, torch.nn.Linear):
        return module
    return next((m for m in module.modules() if isinstance(m, torch.nn.Linear)), None)


def _attention_projection(block: torch.nn.Module) -> torch.nn.Module | None:
    for attention_name in ATTENTION_NAMES:
        attention = getattr(block, attention_name, None)
        if attention is None:
            continue
        for projection_name in PROJECTION_NAMES:
            projection = getattr(attention, projection_name, None)
            if isinstance(projection, torch.nn.Module):
                return projection
    return None


def _mlp_projection(block: torch.nn.Module) -> torch.nn.Module | None:
    for name in MLP_NAMES:
        mlp = getattr(block, name, None)
        if isinstance(mlp, torch.nn.Module):
            return _first_linear(mlp)
    return None


def transformer_blocks(transformer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The repeated blocks: every member of a ModuleList child whose name ends in "blocks" or "layers"."""
    for name, child in transformer.named_children():
        if isinstance(child, torch.nn.ModuleList) and name.endswith(("blocks", "layers")):
            yield from child


class BlockWorkCounter:
    """Counts attention and MLP bodies run in the blocks of one or more transformers.

    Each block contributes up to two units per transformer call: one when its attention runs, one when its
    MLP runs. ``units`` is the running total; compare it with the same count from an uncached run.
    """

    def __init__(self, transformers: Iterable[torch.nn.Module]) -> None:
        self.units = 0
        self._counted: list[torch.nn.Module] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for transformer in transformers:
            for block in transformer_blocks(transformer):
                for projection in (_attention_projection(block), _mlp_projection(block)):
                    if projection is not None:
                        self._handles.append(projection.register_forward_pre_hook(self._count))
                        self._counted.append(projection)
        if not self._handles:
            raise TypeError("found no attention or MLP projections in the transformer blocks to count work on")

    def _count(self, module: torch.nn.Module, args: object) -> None:
        self.units += 1

    def is_reliable(self) -> bool:
        """False when a cache hooked a counted projection itself: our pre-hook would then fire even when the
        cache returned a stored output, so the count would overstate the work."""
        return not any(hasattr(module, "_diffusers_hook") for module in self._counted)

    def take(self) -> int:
        """Units counted since the last call, and restart the count."""
        units, self.units = self.units, 0
        return units

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._counted.clear()
