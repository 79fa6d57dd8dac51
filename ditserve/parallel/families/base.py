"""What a family tells the parallel runner: the shape its transformer returns (CFG-parallel fills a placeholder
of it), how many attention heads and sharded tokens it has, how to install sequence parallelism, and which
linears tensor parallelism splits how. Only the output shape is required: a family with nothing more offers
CFG-parallel alone, and refuses the other methods at start-up."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.errors import ParallelConfigError
from ditserve.parallel.tensor import TensorSplit
from ditserve.parallel.topology import ParallelTopology


class FamilyPlan(ABC):
    #: ``model_index.json`` ``_class_name`` values this plan serves
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def output_shape(self, transformer: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[int, ...]:
        """The shape of ``transformer(**kwargs)``'s output, known before running it."""

    def attention_heads(self, transformer: torch.nn.Module) -> int:
        """Heads of the transformer's sharded attention (Ulysses splits them). A family without a sequence plan
        (CFG-parallel only) refuses Ulysses and ring."""
        raise _no_sequence_plan(transformer)

    def sharded_tokens(self, adapter: Any, params: OmniDiffusionSamplingParams) -> int:
        """How many tokens of a request are split over the sequence-parallel ranks."""
        raise _no_sequence_plan(adapter.transformers()[0])

    def install(self, transformer: torch.nn.Module, topology: ParallelTopology) -> None:
        """Shard the inputs, replace the attention processors, gather the output."""
        raise _no_sequence_plan(transformer)

    def split_tensor_parallel(self, transformer: torch.nn.Module, split: TensorSplit) -> None:
        """Describe the transformer's tensor-parallel split to ``split`` (see ``ditserve.parallel.tensor``).
        A family without a plan refuses tensor parallelism."""
        raise ParallelConfigError(
            f"tensor parallelism has no plan for {type(transformer).__name__}; use tensor_parallel_size=1",
            param="tensor_parallel_size")


def _no_sequence_plan(transformer: torch.nn.Module) -> ParallelConfigError:
    return ParallelConfigError(
        f"sequence parallelism (Ulysses, ring) has no plan for {type(transformer).__name__}; use ulysses_degree=1 "
        "and ring_degree=1 (cfg_parallel_size=2 is available)", param="ulysses_degree")


def token_output_shape(transformer: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[int, ...]:
    """Token-sequence transformers (FLUX, Qwen-Image): one ``proj_out`` row per input token."""
    batch, tokens = kwargs["hidden_states"].shape[:2]
    return batch, tokens, transformer.proj_out.out_features


def split_joint_attention_blocks(transformer: torch.nn.Module, split: TensorSplit,
                                 feed_forwards: tuple[str, str]) -> None:
    """Dual-stream blocks with joint attention (FLUX's double-stream blocks, Qwen-Image's blocks): both streams'
    q/k/v split by heads, both output projections by rows, and each stream's feed-forward (named per family)."""
    for index, block in enumerate(transformer.transformer_blocks):
        split.attention(block.attn, column=("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"),
                        row=("to_out.0", "to_add_out"))
        for name in feed_forwards:
            split.feed_forward(getattr(block, name), f"transformer_blocks.{index}.{name}")
