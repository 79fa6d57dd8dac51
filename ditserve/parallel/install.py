"""Check a parallel config against the loaded model, and install it: the same on every rank.

Every check here runs at start-up (``Omni(...)`` raises ``ParallelConfigError``), except the sequence length,
which depends on each request's size and is checked when the request is made.
"""

from __future__ import annotations

from typing import Any

from ditserve.config import DiffusionParallelConfig, OmniDiffusionSamplingParams
from ditserve.errors import ParallelConfigError
from ditserve.models.base import LoopAdapter
from ditserve.parallel.families import parallel_families, plan_for
from ditserve.parallel.families.base import FamilyPlan
from ditserve.parallel.tensor import SplitCheck, SplitInstall, refuse_fused_projections
from ditserve.parallel.topology import ParallelTopology


def check_tensor_parallel(plan: FamilyPlan, transformer: Any, config: DiffusionParallelConfig, name: str) -> None:
    """Heads and feed-forward widths must divide by tensor_parallel_size, and the linears must be plain."""
    refuse_fused_projections(transformer)
    check = SplitCheck()
    plan.split_tensor_parallel(transformer, check)
    check.raise_if_not_divisible(config.tensor_parallel_size, name)


def check_ulysses_heads(heads: int, config: DiffusionParallelConfig, name: str) -> None:
    tp = config.tensor_parallel_size
    local_heads = heads // tp  # tensor parallelism has already split them (checked before)
    if local_heads % config.ulysses_degree:
        per_rank = f" ({heads} / tensor_parallel_size {tp} per rank)" if tp > 1 else ""
        raise ParallelConfigError(
            f"ulysses_degree={config.ulysses_degree} must divide the {local_heads} attention heads{per_rank} of "
            f"{name}; allowed: {[d for d in range(1, local_heads + 1) if local_heads % d == 0]}",
            param="ulysses_degree")


def check_model(adapter: Any, config: DiffusionParallelConfig) -> FamilyPlan:
    """Start-up checks against the loaded model; returns the family's plan."""
    name = adapter.pipeline_class_name
    if not isinstance(adapter, LoopAdapter):
        raise ParallelConfigError(
            f"{name} runs through diffusers' own pipeline call (no ditserve adapter), which has no "
            "multi-device support; run it without parallel_config", param="parallel_config")
    plan = plan_for(name)
    if plan is None:
        raise ParallelConfigError(
            f"multi-device parallelism is not available for {name}; families with it: {parallel_families()}",
            param="parallel_config")
    for transformer in adapter.transformers():
        if config.tensor_parallel_size > 1:
            check_tensor_parallel(plan, transformer, config, name)
        if config.sequence_parallel_size > 1:
            check_ulysses_heads(plan.attention_heads(transformer), config, name)
    return plan


def check_request_sequence(plan: FamilyPlan, adapter: Any, config: DiffusionParallelConfig,
                           params: OmniDiffusionSamplingParams) -> None:
    tokens = plan.sharded_tokens(adapter, params)
    degree = config.sequence_parallel_size
    if tokens % degree:
        raise ParallelConfigError(
            f"height={params.height} x width={params.width} gives {tokens} image tokens, not divisible by "
            f"ulysses_degree x ring_degree = {degree}; choose a size whose token count divides", param="height")


def install_parallelism(adapter: Any, topology: ParallelTopology) -> FamilyPlan:
    """Check, then install tensor and sequence parallelism on the transformers; returns the family's plan (the
    runner wraps the adapter's ``predict`` for CFG-parallel and checks each request's sequence split with it)."""
    config = topology.config
    plan = check_model(adapter, config)
    if config.tensor_parallel_size > 1:
        for transformer in adapter.transformers():
            plan.split_tensor_parallel(transformer, SplitInstall(topology.tp_rank, topology.tp_size,
                                                                 topology.tp_group))
    if config.sequence_parallel_size > 1:
        for transformer in adapter.transformers():
            plan.install(transformer, topology)
    return plan
