"""Tensor parallelism (Megatron-style) of a DiT's transformer blocks: each rank keeps a shard of the weights.

Within a block, an attention's q/k/v projections (and a joint attention's text-stream add_q/add_k/add_v) are
split by *columns* (output features), which means by heads: rank r keeps heads ``[r * H/tp, (r+1) * H/tp)``
and the attention module's head count becomes the local count. Attention is independent per head, so each rank
attends over its heads with no communication. The output projections (``to_out[0]``, ``to_add_out``) are split
by *rows* (input features, the same heads): each rank's partial product is summed by one all-reduce, and the
bias is added once, after the sum. A feed-forward's first linear is split by columns (its activation is
element-wise, so it applies to each shard), its second by rows plus one all-reduce. Two all-reduces per block
and stream, of the activations' size: the price of keeping only 1/tp of the block weights per rank.

Replicated on every rank: embedders, AdaLN modulation linears (they produce the full hidden width that every
rank's residual stream needs), final norm and projection, text encoders and the VAE.

Norms: per-head q/k RMSNorms (FLUX, Qwen-Image) act on each head alone and work unchanged on local heads.
Wan normalises q and k over *all* heads at once ("rms_norm_across_heads"): those become ``ShardedRMSNorm``,
which all-reduces the sum of squares so every rank normalises its heads by the full-width RMS.

A family describes which linears split how in ``FamilyPlan.split_tensor_parallel``, calling the methods of a
``TensorSplit``. Two implementations walk the same description: ``SplitCheck`` collects the sizes to check
(heads and feed-forward widths divisible by tensor_parallel_size, plain ``nn.Linear`` layers) before anything
changes, and ``SplitInstall`` shards the weights in place, so the full weights are freed.
"""

from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from diffusers.models.activations import GELU, ApproximateGELU, LinearActivation
from torch import nn

from ditserve.errors import ParallelConfigError

#: feed-forward input layers whose activation is element-wise: a column shard of ``proj`` is a shard of the
#: activation's output (gated ones, GEGLU/SwiGLU, chunk ``proj``'s output in two and would need a packed split)
ELEMENTWISE_FF_INPUTS = (GELU, ApproximateGELU, LinearActivation)


def _replace(owner: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(owner.get_submodule(parent_path) if parent_path else owner, name, new)


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    # a copy, not a view: the full tensor must be freed once the module drops it
    return nn.Parameter(tensor.contiguous().clone(), requires_grad=False)


class RowParallelLinear(nn.Module):
    """A linear whose input features are sharded over the TP group: ``all_reduce(x_local @ W_local^T) + b``.
    The bias is kept whole and added once, after the sum (adding it on every rank before would count it tp
    times)."""

    def __init__(self, linear: nn.Linear, input_columns: torch.Tensor, group: Any) -> None:
        super().__init__()
        self.in_features = int(input_columns.numel())
        self.out_features = linear.out_features
        self.weight = _frozen(linear.weight.detach().index_select(1, input_columns.to(linear.weight.device)))
        self.bias = _frozen(linear.bias.detach()) if linear.bias is not None else None
        self.group = group

    def forward(self, local_input: torch.Tensor) -> torch.Tensor:
        partial = nn.functional.linear(local_input, self.weight)
        dist.all_reduce(partial, group=self.group)
        return partial + self.bias if self.bias is not None else partial

    def extra_repr(self) -> str:
        return f"in_features={self.in_features} (local), out_features={self.out_features}, all-reduced"


class ShardedRMSNorm(nn.Module):
    """An RMSNorm over ``full_width`` features whose input is this rank's contiguous slice of them: the sum of
    squares is all-reduced, so the local slice is scaled by the full-width RMS (as the unsharded norm does)."""

    def __init__(self, norm: nn.RMSNorm, rank: int, size: int, group: Any) -> None:
        super().__init__()
        self.full_width = int(norm.normalized_shape[-1])
        self.eps = norm.eps
        width = self.full_width // size
        self.weight = _frozen(norm.weight.detach().narrow(0, rank * width, width)) if norm.weight is not None \
            else None
        self.group = group

    def forward(self, local: torch.Tensor) -> torch.Tensor:
        upcast = local.float()  # accumulate in float32 as torch's rms_norm does for low-precision inputs
        square_sum = upcast.square().sum(dim=-1, keepdim=True)
        dist.all_reduce(square_sum, group=self.group)
        eps = self.eps if self.eps is not None else torch.finfo(local.dtype).eps
        normed = upcast * torch.rsqrt(square_sum / self.full_width + eps)
        if self.weight is not None:
            normed = normed * self.weight.float()
        return normed.to(local.dtype)


class TensorSplit(ABC):
    """What a family's plan says about one transformer: which modules split how (see the module docstring)."""

    @abstractmethod
    def attention(self, attn: nn.Module, column: Sequence[str], row: Sequence[str],
                  norms_across_heads: Sequence[str] = ()) -> None:
        """Column-split ``column`` (q/k/v projections, by heads), row-split ``row`` (output projections), set the
        module's head count to the local heads; ``norms_across_heads`` are RMSNorms over all heads' features."""

    @abstractmethod
    def feed_forward(self, ff: nn.Module, where: str) -> None:
        """A diffusers ``FeedForward``: ``net[0].proj`` column-split, ``net[2]`` row-split."""

    @abstractmethod
    def column(self, owner: nn.Module, path: str, where: str) -> None:
        """One linear split by output features (its output feeds a row-split linear of this plan)."""

    @abstractmethod
    def packed_row(self, owner: nn.Module, path: str, block_widths: Sequence[int], where: str) -> None:
        """A row-split linear whose input is the concatenation of several column-split outputs of the given
        widths (FLUX single blocks: ``proj_out(cat(attention, mlp))``): each block's columns split alike."""


def _linear(owner: nn.Module, path: str) -> nn.Linear:
    module = owner.get_submodule(path)
    # exact type: quantized layers (int8, fp8, GGUF) subclass or replace nn.Linear with their own storage
    if type(module) is not nn.Linear:
        raise ParallelConfigError(
            f"tensor parallelism shards plain nn.Linear layers; {path} is {type(module).__name__} (a quantized "
            "model?): use tensor_parallel_size=1 with quantization", param="tensor_parallel_size")
    return module


def _feed_forward_layers(ff: nn.Module, where: str) -> tuple[str, str]:
    net = getattr(ff, "net", None)
    if net is None or len(net) < 3 or not isinstance(net[0], ELEMENTWISE_FF_INPUTS):
        kind = type(net[0]).__name__ if net is not None and len(net) else type(ff).__name__
        raise ParallelConfigError(
            f"tensor parallelism splits feed-forwards with an element-wise activation (GELU, ApproximateGELU, "
            f"LinearActivation); {where} uses {kind}: use tensor_parallel_size=1", param="tensor_parallel_size")
    return "net.0.proj", "net.2"


class SplitCheck(TensorSplit):
    """Collects the sizes tensor_parallel_size must divide and the layers' types; changes nothing."""

    def __init__(self) -> None:
        self.heads: set[int] = set()
        self.widths: dict[str, int] = {}

    def attention(self, attn: nn.Module, column: Sequence[str], row: Sequence[str],
                  norms_across_heads: Sequence[str] = ()) -> None:
        self.heads.add(int(attn.heads))
        for path in (*column, *row):
            _linear(attn, path)

    def feed_forward(self, ff: nn.Module, where: str) -> None:
        first, second = _feed_forward_layers(ff, where)
        self.widths[where] = _linear(ff, first).out_features
        _linear(ff, second)

    def column(self, owner: nn.Module, path: str, where: str) -> None:
        self.widths[where] = _linear(owner, path).out_features

    def packed_row(self, owner: nn.Module, path: str, block_widths: Sequence[int], where: str) -> None:
        _linear(owner, path)

    def raise_if_not_divisible(self, size: int, model: str) -> None:
        sizes = [*sorted(self.heads), *self.widths.values()]
        if all(value % size == 0 for value in sizes):
            return
        common = math.gcd(*sizes)
        allowed = [d for d in range(1, common + 1) if common % d == 0]
        widths = sorted(set(self.widths.values()))
        raise ParallelConfigError(
            f"tensor_parallel_size={size} must divide the attention heads {sorted(self.heads)} and the "
            f"feed-forward widths {widths} of {model}; allowed: {allowed}", param="tensor_parallel_size")


class SplitInstall(TensorSplit):
    """Shards the weights in place for TP rank ``rank`` of ``size`` (``SplitCheck`` has passed)."""

    def __init__(self, rank: int, size: int, group: Any) -> None:
        self.rank, self.size, self.group = rank, size, group

    def _local_range(self, width: int) -> torch.Tensor:
        part = width // self.size
        return torch.arange(self.rank * part, (self.rank + 1) * part)

    def _split_columns(self, owner: nn.Module, path: str) -> None:
        linear = _linear(owner, path)
        rows = self._local_range(linear.out_features).to(linear.weight.device)
        linear.weight = _frozen(linear.weight.detach().index_select(0, rows))
        if linear.bias is not None:
            linear.bias = _frozen(linear.bias.detach().index_select(0, rows))
        linear.out_features = int(rows.numel())

    def _split_rows(self, owner: nn.Module, path: str, block_widths: Sequence[int]) -> None:
        linear = _linear(owner, path)
        if sum(block_widths) != linear.in_features:
            raise ParallelConfigError(
                f"tensor parallelism: {path} takes {linear.in_features} input features, the plan's blocks sum to "
                f"{sum(block_widths)}", param="tensor_parallel_size")
        offsets = [0, *itertools.accumulate(block_widths)][:-1]
        columns = torch.cat([offset + self._local_range(width)
                             for offset, width in zip(offsets, block_widths, strict=True)])
        _replace(owner, path, RowParallelLinear(linear, columns, self.group))

    def attention(self, attn: nn.Module, column: Sequence[str], row: Sequence[str],
                  norms_across_heads: Sequence[str] = ()) -> None:
        for path in column:
            self._split_columns(attn, path)
        for path in row:
            self._split_rows(attn, path, [_linear(attn, path).in_features])
        for name in norms_across_heads:
            setattr(attn, name, ShardedRMSNorm(getattr(attn, name), self.rank, self.size, self.group))
        # processors reshape by the head count (Wan) or by inner_dim // heads (Qwen-Image): keep both local
        attn.heads //= self.size
        for name in ("inner_dim", "kv_inner_dim"):
            if isinstance(getattr(attn, name, None), int):
                setattr(attn, name, getattr(attn, name) // self.size)

    def feed_forward(self, ff: nn.Module, where: str) -> None:
        first, second = _feed_forward_layers(ff, where)
        self._split_columns(ff, first)
        self._split_rows(ff, second, [_linear(ff, second).in_features])

    def column(self, owner: nn.Module, path: str, where: str) -> None:
        self._split_columns(owner, path)

    def packed_row(self, owner: nn.Module, path: str, block_widths: Sequence[int], where: str) -> None:
        self._split_rows(owner, path, block_widths)


def refuse_fused_projections(transformer: nn.Module) -> None:
    """Fused q/k/v (``fuse_projections``) interleave the three projections in one weight: not split here."""
    for name, module in transformer.named_modules():
        if getattr(module, "fused_projections", False):
            raise ParallelConfigError(
                f"tensor parallelism needs unfused q/k/v projections; {name} was fused (unfuse_projections() "
                "first)", param="tensor_parallel_size")
