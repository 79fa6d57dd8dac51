"""Cutting tensors into this rank's sequence shard and gathering them back, and the hooks that do it around a
transformer's forward (the family plans say which tensors, on which dimension)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ditserve.errors import ParallelConfigError
from ditserve.parallel.topology import ParallelTopology


class SequenceSplitError(ParallelConfigError):
    """A request's token count does not divide by the sequence-parallel degree. Raised by every rank at the same
    point (all ranks see the same shapes), before any collective of that forward: the group stays in step."""


def shard(tensor: torch.Tensor, dim: int, topology: ParallelTopology, what: str) -> torch.Tensor:
    """This rank's contiguous chunk of ``tensor`` along ``dim`` (chunk index = sp rank)."""
    size, parts = tensor.shape[dim], topology.sp_size
    if size % parts:
        raise SequenceSplitError(
            f"{what} has {size} tokens, not divisible by the sequence-parallel degree "
            f"ulysses_degree x ring_degree = {parts}; choose a height/width (or frame count) that makes it divide",
            param="ulysses_degree")
    return tensor.narrow(dim, topology.sp_rank * (size // parts), size // parts)


def gather(tensor: torch.Tensor, dim: int, topology: ParallelTopology) -> torch.Tensor:
    """Concatenate every sp rank's chunk along ``dim``, in sp-rank order (the inverse of ``shard``)."""
    parts = [torch.empty_like(tensor) for _ in range(topology.sp_size)]
    dist.all_gather(parts, tensor.contiguous(), group=topology.sp_group)
    return torch.cat(parts, dim=dim)


def shard_kwargs_hook(names_and_dims: Sequence[tuple[str, int]], topology: ParallelTopology,
                      on_call: Callable[[dict[str, Any]], None] | None = None) -> Callable:
    """A forward pre-hook (``with_kwargs=True``) that replaces the named keyword tensors by their shard."""

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if args:
            raise ParallelConfigError(
                f"sequence parallelism needs {type(module).__name__} to be called with keyword arguments",
                param="ulysses_degree")
        if on_call is not None:
            on_call(kwargs)
        kwargs = dict(kwargs)
        for name, dim in names_and_dims:
            if kwargs.get(name) is not None:
                kwargs[name] = shard(kwargs[name], dim, topology, name)
        return args, kwargs

    return hook


def gather_output_hook(dim: int, topology: ParallelTopology) -> Callable:
    """A forward hook that gathers a module's (tensor) output along ``dim`` over the sp group."""

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return gather(output, dim, topology)

    return hook
