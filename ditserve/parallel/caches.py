"""Step caches under parallelism: every rank must take the same skip decision, or ranks would wait for each
other in different collectives.

* CFG-parallel: each rank runs one guidance branch and the caches keep state per branch, so a rank decides for
  its own branch from the whole branch output, exactly as one process would. Nothing to agree.
* Sequence parallel: a rank sees only its shard of the signal a cache compares (TeaCache's modulated input,
  MagCache's residual), so decisions could differ. Rank 0 of each branch group (the ranks computing one CFG
  branch) decides and broadcasts its decision; the other ranks keep their own state (their stored residuals
  are of their own shard) but follow rank 0. Rank 0 judges from its shard: a sample of the image's tokens, so
  skip decisions may differ from a single process's near the threshold (the output of a skipped step is still
  consistent across ranks).
* Tensor parallel: every TP rank holds the whole activations, and after each all-reduce they are bitwise equal
  in practice, so every rank would compute the same decision. That rests on the backend returning identical
  bits on every rank (gloo and NCCL's ring algorithms do; nothing in their contract promises it), and a
  different decision on one rank would hang the group in mismatched collectives. So TP ranks follow rank 0 of
  the branch group too: one int32 broadcast per step, nothing to rely on.
* cache-dit decides inside the library, on the local shard, with no place to agree: refused with any
  multi-device parallelism (with CFG-parallel, its guidance handling also expects both branches in one process).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ditserve.cache.hooks import Decision, SkipPolicy
from ditserve.cache.residual_backend import ResidualCacheBackend
from ditserve.errors import ParallelConfigError
from ditserve.parallel.topology import ParallelTopology


class AgreedSkipPolicy(SkipPolicy):
    """A skip policy whose decisions are rank 0's (of the branch group) on every rank of the group."""

    def __init__(self, inner: SkipPolicy, topology: ParallelTopology) -> None:
        self.inner = inner
        self.topology = topology
        self.needs_modulated_input = inner.needs_modulated_input  # type: ignore[misc]

    def new_state(self, label: str) -> Any:
        return self.inner.new_state(label)

    def decide(self, state: Any, step: int, num_steps: int, modulated: torch.Tensor | None) -> Decision:
        local = self.inner.decide(state, step, num_steps, modulated)
        device = modulated.device if modulated is not None else torch.device("cpu")
        flag = torch.tensor([int(local.skip)], dtype=torch.int32, device=device)
        group = self.topology.branch_group
        dist.broadcast(flag, src=dist.get_global_rank(group, 0), group=group)
        agreed = bool(flag.item())
        if agreed == local.skip:
            return local
        return Decision(skip=agreed, distance=local.distance, reason=f"branch rank 0 decided ({local.reason})")

    def observe_computed(self, state: Any, step: int, blocks_in: torch.Tensor, blocks_out: torch.Tensor) -> None:
        self.inner.observe_computed(state, step, blocks_in, blocks_out)

    def computed_instead(self, state: Any) -> None:
        self.inner.computed_instead(state)


def agree_on_skips(backend: Any, topology: ParallelTopology) -> None:
    """Make a cache backend's decisions agree across ranks (before ``enable``); refuse one that cannot."""
    config = topology.config
    if isinstance(backend, ResidualCacheBackend):
        if config.sequence_parallel_size * config.tensor_parallel_size > 1:
            backend.policy_wrapper = lambda policy: AgreedSkipPolicy(policy, topology)
        return
    if config.world_size > 1:
        raise ParallelConfigError(
            f"cache_backend={backend.name!r} cannot be combined with multi-device parallelism yet (its decisions "
            "are made inside the library, per process); use 'tea_cache' or 'mag_cache'", param="cache_backend")
