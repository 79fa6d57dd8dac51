"""CFG-parallel: the conditional and unconditional transformer passes of a step run on different ranks.

``CfgParallelPredictor`` wraps a family's ``predict``: it hands ``predict`` a step batch whose transformer call
computes a branch only on the rank that owns it. Adapters call "cond" and then "uncond" and combine the two; that
order is kept. On the rank that does not own a branch, its call computes nothing and returns a *placeholder* of
the output's shape (the family plan knows it from the inputs); after the "uncond" call each owner broadcasts its
branch's output to the other rank, which fills the placeholder in place. Views an adapter took of the cond output
meanwhile (Qwen-Image slices it) see the filled values, so ``predict`` combines real tensors on both ranks and
both take the same scheduler step. The two branches may cover different rows (in a step batch only the requests
with guidance run "uncond"), which is why each branch travels in its own broadcast.

A step that calls only "cond" (no request of the batch runs guidance) gets the cond rank's output broadcast when
``predict`` returns: correct, but with no speed-up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from ditserve.errors import ParallelConfigError
from ditserve.models.base import RequestState, StepBatch, TransformerCall
from ditserve.parallel.topology import ParallelTopology

#: which cfg rank computes which branch
BRANCH_OWNER = {"cond": 0, "uncond": 1}

#: (transformer, call kwargs) -> the shape the transformer call returns
OutputShape = Callable[[torch.nn.Module, dict[str, Any]], tuple[int, ...]]


class CfgParallelStep:
    """One ``predict`` call on one rank: the branch outputs computed or awaited here, until exchanged."""

    def __init__(self, topology: ParallelTopology) -> None:
        self.topology = topology
        #: "transformer_name:branch" -> the computed output, or the placeholder to fill
        self.pending: dict[str, torch.Tensor] = {}

    @property
    def cfg_rank(self) -> int:
        return self.topology.coordinates.cfg_rank

    def call(self, compute: Callable[[], torch.Tensor], branch: str, transformer_name: str,
             make_placeholder: Callable[[], torch.Tensor]) -> torch.Tensor:
        if branch not in BRANCH_OWNER:
            raise ParallelConfigError(f"CFG-parallel knows the branches {sorted(BRANCH_OWNER)}, got {branch!r}",
                                      param="cfg_parallel_size")
        output = compute() if BRANCH_OWNER[branch] == self.cfg_rank else make_placeholder()
        self.pending[f"{transformer_name}:{branch}"] = output
        if branch == "uncond":
            for pending_branch in ("cond", "uncond"):
                self._share(f"{transformer_name}:{pending_branch}")
        return output

    def _share(self, key: str) -> None:
        """The owner of the branch sends its output; the other rank receives it into its placeholder."""
        tensor = self.pending.pop(key)
        owner = dist.get_global_rank(self.topology.cfg_group, BRANCH_OWNER[key.rsplit(":", 1)[1]])
        # a placeholder is contiguous by construction; a computed output is sent from a contiguous copy if need be
        dist.broadcast(tensor.contiguous(), src=owner, group=self.topology.cfg_group)

    def finish(self) -> None:
        """After ``predict``: a "cond" never followed by "uncond" (no guidance this step) still has to reach the
        uncond rank. Both ranks made the same calls, so both know which outputs are pending."""
        for key in sorted(self.pending):
            self._share(key)


class CfgParallelPredictor:
    """A family's ``predict`` with the two guidance branches on two ranks."""

    def __init__(self, predict: Callable[[StepBatch], torch.Tensor], topology: ParallelTopology,
                 output_shape: OutputShape, transformers: Callable[[str], torch.nn.Module],
                 device: torch.device) -> None:
        self.predict = predict
        self.topology = topology
        self.output_shape = output_shape
        self.transformers = transformers
        self.device = device

    def __call__(self, batch: StepBatch) -> torch.Tensor:
        step = CfgParallelStep(self.topology)
        output = self.predict(replace(batch, call=self._split_call(step, batch.call)))
        step.finish()
        return output

    def _split_call(self, step: CfgParallelStep, call: TransformerCall) -> TransformerCall:
        def split_call(branch: str, states: Sequence[RequestState], transformer_name: str = "transformer",
                       **kwargs: Any) -> torch.Tensor:
            module = self.transformers(transformer_name)

            def placeholder() -> torch.Tensor:
                return torch.empty(self.output_shape(module, kwargs), dtype=module.dtype, device=self.device)

            return step.call(lambda: call(branch, states, transformer_name, **kwargs), branch, transformer_name,
                             placeholder)

        return split_call
