"""CFG-parallel: the conditional and unconditional transformer passes of a step run on different ranks.

Adapters call ``call_transformer("cond", ...)`` and then ``call_transformer("uncond", ...)`` and combine the two
in ``predict``. That order is kept: on the rank that owns "uncond" the "cond" call computes nothing and returns
an empty *placeholder*; the "uncond" call computes the branch; then the pair exchanges outputs (one
all-gather) and the placeholder is filled in place (resized to the real shape), so ``predict`` combines real
tensors on both ranks and both take the same scheduler step. No adapter needs to know about it.

A step that calls only "cond" (no negative prompt) fills the placeholder from the cond rank when ``predict``
returns: correct, but without speed-up. An adapter that computes on the cond output before asking for
"uncond" would touch an empty placeholder and fail loudly (shape error), never silently.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ditserve.errors import ParallelConfigError
from ditserve.parallel.topology import ParallelTopology

logger = logging.getLogger(__name__)

#: which cfg rank computes which branch
BRANCH_OWNER = {"cond": 0, "uncond": 1}


class CfgParallelStep:
    """State of one ``predict`` call on one rank: the branch outputs computed here and the placeholders to fill."""

    def __init__(self, topology: ParallelTopology) -> None:
        self.topology = topology
        self.computed: dict[str, torch.Tensor] = {}
        self.placeholders: dict[str, torch.Tensor] = {}

    @property
    def cfg_rank(self) -> int:
        return self.topology.coordinates.cfg_rank

    def call(self, compute: Callable[..., torch.Tensor], branch: str, transformer_name: str,
             kwargs: dict[str, Any], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if branch not in BRANCH_OWNER:
            raise ParallelConfigError(f"CFG-parallel knows the branches {sorted(BRANCH_OWNER)}, got {branch!r}",
                                      param="cfg_parallel_size")
        key = f"{transformer_name}:{branch}"
        if BRANCH_OWNER[branch] == self.cfg_rank:
            self.computed[key] = compute(branch, transformer_name, **kwargs)
        if branch == "cond":
            if key in self.computed:
                return self.computed[key]
            self.placeholders[key] = torch.empty(0, dtype=dtype, device=device)
            return self.placeholders[key]
        return self._exchange(transformer_name)

    def _exchange(self, transformer_name: str) -> torch.Tensor:
        """Both branches are now known on one rank each: all-gather them and fill the placeholders."""
        mine = self.computed[f"{transformer_name}:{'cond' if self.cfg_rank == 0 else 'uncond'}"]
        parts = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(parts, mine.contiguous(), group=self.topology.cfg_group)
        cond, uncond = parts
        self._fill(f"{transformer_name}:cond", cond)
        self.computed.pop(f"{transformer_name}:cond", None)
        self.computed.pop(f"{transformer_name}:uncond", None)
        return uncond

    def _fill(self, key: str, value: torch.Tensor) -> None:
        placeholder = self.placeholders.pop(key, None)
        if placeholder is None:
            return
        if placeholder.dtype != value.dtype:
            raise ParallelConfigError(
                f"CFG-parallel: the transformer returned {value.dtype}, expected {placeholder.dtype} (its parameter "
                "dtype); run this model without cfg_parallel_size", param="cfg_parallel_size")
        placeholder.resize_(value.shape).copy_(value)

    def finish(self) -> None:
        """After ``predict``: a "cond" never followed by "uncond" (no guidance this step) still has to reach the
        uncond rank. Both ranks saw the same calls, so both know which outputs are pending."""
        for key in sorted(set(self.computed) | set(self.placeholders)):
            if key.endswith(":cond"):
                self._fill(key, self._broadcast_from_cond_rank(self.computed.get(key), self.placeholders.get(key)))
        self.computed.clear()

    def _broadcast_from_cond_rank(self, source: torch.Tensor | None, placeholder: torch.Tensor | None) -> torch.Tensor:
        group = self.topology.cfg_group
        cond_rank = dist.get_global_rank(group, BRANCH_OWNER["cond"])
        shape = [tuple(source.shape) if source is not None else None]
        dist.broadcast_object_list(shape, src=cond_rank, group=group)
        if source is None:
            assert placeholder is not None
            source = torch.empty(shape[0], dtype=placeholder.dtype, device=placeholder.device)
        dist.broadcast(source, src=cond_rank, group=group)
        return source


def install_cfg_parallel(adapter: Any, topology: ParallelTopology) -> None:
    """Route the adapter's branch calls through CFG-parallel (an instance attribute shadows the method)."""
    original_call = adapter.call_transformer
    original_predict = adapter.predict
    current: dict[str, CfgParallelStep] = {}

    def call_transformer(branch: str, transformer_name: str = "transformer", **kwargs: Any) -> Any:
        step = current["step"]
        module = getattr(adapter.pipeline, transformer_name)
        return step.call(lambda b, n, **kw: original_call(b, n, **kw), branch, transformer_name, kwargs,
                         module.dtype, adapter.device)

    def predict(state: Any, step_index: int, t: torch.Tensor) -> torch.Tensor:
        current["step"] = CfgParallelStep(topology)
        try:
            output = original_predict(state, step_index, t)
            current["step"].finish()
        finally:
            current.pop("step", None)
        return output

    adapter.call_transformer = call_transformer
    adapter.predict = predict
