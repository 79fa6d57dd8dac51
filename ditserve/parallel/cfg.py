"""CFG-parallel: the conditional and unconditional transformer passes of a step run on different ranks.

Adapters call ``call_transformer("cond", ...)`` and then ``call_transformer("uncond", ...)`` and combine the two
in ``predict``. That order is kept: on the rank that owns "uncond" the "cond" call computes nothing and returns
a *placeholder* of the output's shape (the family plan knows it from the inputs); the "uncond" call computes
the branch; then the pair exchanges outputs (one all-gather) and the placeholder is filled in place. Views an
adapter took of the cond output meanwhile (Qwen-Image slices it) see the filled values, so ``predict``
combines real tensors on both ranks and both take the same scheduler step. No adapter needs to know.

A step that calls only "cond" (no negative prompt) gets the cond rank's output broadcast when ``predict``
returns: correct, but with no speed-up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ditserve.errors import ParallelConfigError
from ditserve.parallel.topology import ParallelTopology

#: which cfg rank computes which branch
BRANCH_OWNER = {"cond": 0, "uncond": 1}

#: (transformer, call kwargs) -> the shape the transformer call returns
OutputShape = Callable[[torch.nn.Module, dict[str, Any]], tuple[int, ...]]


class CfgParallelStep:
    """One ``predict`` call on one rank: the branch outputs computed here and the placeholders to fill."""

    def __init__(self, topology: ParallelTopology) -> None:
        self.topology = topology
        self.computed: dict[str, torch.Tensor] = {}
        self.placeholders: dict[str, torch.Tensor] = {}

    @property
    def cfg_rank(self) -> int:
        return self.topology.coordinates.cfg_rank

    def call(self, compute: Callable[[], torch.Tensor], branch: str, transformer_name: str,
             make_placeholder: Callable[[], torch.Tensor]) -> torch.Tensor:
        if branch not in BRANCH_OWNER:
            raise ParallelConfigError(f"CFG-parallel knows the branches {sorted(BRANCH_OWNER)}, got {branch!r}",
                                      param="cfg_parallel_size")
        key = f"{transformer_name}:{branch}"
        if BRANCH_OWNER[branch] == self.cfg_rank:
            self.computed[key] = compute()
        if branch == "cond":
            if key not in self.computed:
                self.placeholders[key] = make_placeholder()
                return self.placeholders[key]
            return self.computed[key]
        return self._exchange(transformer_name)

    def _exchange(self, transformer_name: str) -> torch.Tensor:
        """Both branches are now known, on one rank each: all-gather them and fill the placeholder."""
        cond_key, uncond_key = f"{transformer_name}:cond", f"{transformer_name}:uncond"
        mine = self.computed.pop(cond_key if self.cfg_rank == BRANCH_OWNER["cond"] else uncond_key)
        self.computed.pop(uncond_key, None)
        parts = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(parts, mine.contiguous(), group=self.topology.cfg_group)
        cond, uncond = parts
        self._fill(cond_key, cond)
        return uncond

    def _fill(self, key: str, value: torch.Tensor) -> None:
        placeholder = self.placeholders.pop(key, None)
        if placeholder is None:
            return
        if placeholder.shape != value.shape or placeholder.dtype != value.dtype:
            raise ParallelConfigError(
                f"CFG-parallel expected a transformer output of {tuple(placeholder.shape)} {placeholder.dtype}, "
                f"got {tuple(value.shape)} {value.dtype}; the family plan's output shape is wrong",
                param="cfg_parallel_size")
        placeholder.copy_(value)

    def finish(self) -> None:
        """After ``predict``: a "cond" never followed by "uncond" (no guidance this step) still has to reach the
        uncond rank. Both ranks made the same calls, so both know which outputs are pending."""
        for key in sorted(set(self.computed) | set(self.placeholders)):
            if key.endswith(":cond"):
                source = self.computed.pop(key, None)
                buffer = source if source is not None else self.placeholders.pop(key)
                cond_rank = dist.get_global_rank(self.topology.cfg_group, BRANCH_OWNER["cond"])
                dist.broadcast(buffer, src=cond_rank, group=self.topology.cfg_group)
        self.computed.clear()


def install_cfg_parallel(adapter: Any, topology: ParallelTopology, output_shape: OutputShape) -> None:
    """Route the adapter's branch calls through CFG-parallel (instance attributes shadow the methods)."""
    original_call = adapter.call_transformer
    original_predict = adapter.predict
    current: dict[str, CfgParallelStep] = {}

    def call_transformer(branch: str, transformer_name: str = "transformer", **kwargs: Any) -> Any:
        module = getattr(adapter.pipeline, transformer_name)

        def placeholder() -> torch.Tensor:
            return torch.empty(output_shape(module, kwargs), dtype=module.dtype, device=adapter.device)

        return current["step"].call(lambda: original_call(branch, transformer_name, **kwargs), branch,
                                    transformer_name, placeholder)

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
