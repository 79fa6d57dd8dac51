"""Data parallelism for the demo trainers, on torch.distributed.

Started by ``torchrun --nproc-per-node N -m ditserve.demo train ...`` (or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``), every process draws the same batch (batches are seeded by
step), trains on its own block of rows and averages the gradients with the others before the optimiser step, so
all processes keep identical weights and the run sees the batches a single process would. Rank 0 alone logs,
checkpoints and writes the result. It is for machines with several GPUs (each process takes the GPU of its
``LOCAL_RANK``): on a 2-core CPU two one-thread processes run no faster than one process on two threads.

Wall-clock decisions (the learning-rate schedule's progress, the time budget's end) are rank 0's, broadcast every
step: clocks that differ by a millisecond must not give the processes different learning rates or stop them at
different steps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ditserve.errors import InvalidParameterError


def launched_rank() -> int:
    """This process's rank in a launched run (0 without a launcher), before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def launched_world() -> int:
    """How many processes a launched run has (1 without a launcher), before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def leave() -> None:
    """End this process's part in a launched run (nothing without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class DataShard:
    """This process's place in a data-parallel run: ``world`` processes, this one ``rank``."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls, device: torch.device) -> DataShard:
        """One process (no launcher), or this process's shard of a launched run, joining its process group (gloo
        on CPU, NCCL on CUDA) unless the caller already did."""
        world = launched_world()
        if world == 1:
            return cls()
        rank = launched_rank()
        shard = cls(rank, world, int(os.environ.get("LOCAL_RANK", rank)))
        if device.type == "cuda":
            torch.cuda.set_device(shard.local_rank)  # NCCL's own buffers go to the current device
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=shard.rank, world_size=world)
        return shard

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device this process trains on: its own GPU on a multi-GPU machine."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.world > 1 else device

    def rows(self, batch: int) -> slice:
        """This process's block of a batch's rows."""
        if batch % self.world:
            raise InvalidParameterError(f"batch ({batch}) must be a multiple of the number of processes "
                                        f"({self.world})", param="batch")
        share = batch // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def start_alike(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Give every process rank 0's values of ``parameters`` (randomly initialised ones, such as a LoRA's A or a
        probe's, differ between processes otherwise)."""
        if self.world == 1:
            return
        with torch.no_grad():
            for parameter in parameters:
                dist.broadcast(parameter.data, src=0)

    def average_gradients(self, parameters: Sequence[torch.nn.Parameter]) -> None:
        """Replace every gradient by its mean over the processes, in one collective. A parameter no process
        computed a gradient for keeps none (the optimiser skips it, as in one process); one that only some did
        counts zeros for the others."""
        if self.world == 1 or not parameters:
            return
        flat = torch.cat([p.grad.float().flatten() if p.grad is not None else p.new_zeros(p.numel(), dtype=torch.float32)
                          for p in parameters])
        had = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32, device=flat.device)
        reduced = torch.cat([flat, had])
        dist.all_reduce(reduced)
        offset = 0
        for parameter, count in zip(parameters, reduced[flat.numel():].tolist(), strict=True):
            size = parameter.numel()
            if count > 0:
                mean = reduced[offset: offset + size].view_as(parameter) / self.world
                parameter.grad = mean.to(parameter.dtype)
            offset += size

    def agreed(self, value: float) -> float:
        """Rank 0's ``value`` on every process."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.broadcast(tensor, src=0)
        return tensor.item()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over the processes (for logging a batch's loss)."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return tensor.item() / self.world

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
