"""Which rank does what: the layout of ranks over CFG branches, ring, Ulysses and tensor-parallel degrees, and
their groups.

Layout (outermost first): ``rank = cfg_rank * (sp_size * tp) + sp_rank * tp + tp_rank`` with ``sp_rank =
ring_rank * ulysses_degree + ulysses_rank``. The tensor-parallel group is innermost: it all-reduces the
activations twice per block and stream (the most frequent, latency-bound traffic), so it must stay on
neighbouring devices (one NVLink island), as in Megatron. The Ulysses group (an all-to-all per attention) comes
next, then the ring group (K/V blocks passed between neighbours, overlappable); the CFG pair exchanges one
output per step, so it may cross machines. With tp = 1 this is the layout without TP.

A sequence is cut into ``sp_size`` equal chunks; the rank with ``sp_rank = ring_rank * ulysses_degree +
ulysses_rank`` holds chunk ``sp_rank``. After the Ulysses all-to-all a rank holds the ``ulysses_degree``
chunks of its ring position, which are contiguous: the ring then passes whole ring chunks around.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from ditserve.config import DiffusionParallelConfig


@dataclass(frozen=True)
class RankCoordinates:
    cfg_rank: int
    ring_rank: int
    ulysses_rank: int
    tp_rank: int = 0


def coordinates_of(rank: int, config: DiffusionParallelConfig) -> RankCoordinates:
    tp = config.tensor_parallel_size
    cfg_rank, inner = divmod(rank, config.sequence_parallel_size * tp)
    sp_rank, tp_rank = divmod(inner, tp)
    ring_rank, ulysses_rank = divmod(sp_rank, config.ulysses_degree)
    return RankCoordinates(cfg_rank=cfg_rank, ring_rank=ring_rank, ulysses_rank=ulysses_rank, tp_rank=tp_rank)


def rank_of(coordinates: RankCoordinates, config: DiffusionParallelConfig) -> int:
    tp = config.tensor_parallel_size
    sp_rank = coordinates.ring_rank * config.ulysses_degree + coordinates.ulysses_rank
    return (coordinates.cfg_rank * config.sequence_parallel_size + sp_rank) * tp + coordinates.tp_rank


@dataclass
class ParallelTopology:
    """This rank's coordinates and the process groups it belongs to (``None``: degree 1, nothing to talk)."""

    config: DiffusionParallelConfig
    rank: int
    coordinates: RankCoordinates
    cfg_group: Any = None
    sp_group: Any = None
    ulysses_group: Any = None
    ring_group: Any = None
    tp_group: Any = None
    #: every rank computing the same CFG branch (sequence and tensor parallel together): the ranks that must
    #: take the same cache decisions
    branch_group: Any = None
    #: global ranks of this rank's ring group, in ring order (P2P ops address global ranks)
    ring_ranks: tuple[int, ...] = ()

    @property
    def sp_size(self) -> int:
        return self.config.sequence_parallel_size

    @property
    def sp_rank(self) -> int:
        return self.coordinates.ring_rank * self.config.ulysses_degree + self.coordinates.ulysses_rank

    @property
    def tp_size(self) -> int:
        return self.config.tensor_parallel_size

    @property
    def tp_rank(self) -> int:
        return self.coordinates.tp_rank

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


def _all_groups(config: DiffusionParallelConfig, key: Any) -> dict[Any, list[int]]:
    """Ranks grouped by ``key(coordinates)``: every rank with the same key shares a group."""
    groups: dict[Any, list[int]] = {}
    for rank in range(config.world_size):
        groups.setdefault(key(coordinates_of(rank, config)), []).append(rank)
    return groups


def _my_group(config: DiffusionParallelConfig, rank: int, key: Any, size: int) -> tuple[Any, tuple[int, ...]]:
    """Create every group of one kind (``new_group`` is collective: all ranks must create all groups, in the
    same order) and return this rank's group and its members."""
    mine, members = None, ()
    my_key = key(coordinates_of(rank, config))
    for group_key, ranks in sorted(_all_groups(config, key).items()):
        group = dist.new_group(ranks) if size > 1 else None
        if group_key == my_key:
            mine, members = group, tuple(ranks)
    return mine, members


def build_topology(config: DiffusionParallelConfig, rank: int) -> ParallelTopology:
    """Create the process groups of ``config`` (call on every rank after ``init_process_group``)."""
    coords = coordinates_of(rank, config)
    tp = config.tensor_parallel_size
    cfg_group, _ = _my_group(config, rank, lambda c: (c.ring_rank, c.ulysses_rank, c.tp_rank),
                             config.cfg_parallel_size)
    sp_group, _ = _my_group(config, rank, lambda c: (c.cfg_rank, c.tp_rank), config.sequence_parallel_size)
    ulysses_group, _ = _my_group(config, rank, lambda c: (c.cfg_rank, c.ring_rank, c.tp_rank),
                                 config.ulysses_degree)
    ring_group, ring_ranks = _my_group(config, rank, lambda c: (c.cfg_rank, c.ulysses_rank, c.tp_rank),
                                       config.ring_degree)
    tp_group, _ = _my_group(config, rank, lambda c: (c.cfg_rank, c.ring_rank, c.ulysses_rank), tp)
    branch_group, _ = _my_group(config, rank, lambda c: c.cfg_rank, config.sequence_parallel_size * tp)
    return ParallelTopology(config=config, rank=rank, coordinates=coords, cfg_group=cfg_group, sp_group=sp_group,
                            ulysses_group=ulysses_group, ring_group=ring_group, tp_group=tp_group,
                            branch_group=branch_group, ring_ranks=ring_ranks)
