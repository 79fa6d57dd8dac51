"""A rank's life: join the process group, load the model with the parallel plan, then run the steps rank 0
plans until it says stop. Rank 0 calls ``start_rank`` in the engine process; the other ranks run
``worker_main`` (spawned by ``MultiProcessRunner``) or ``run_torchrun_worker`` (started by torchrun)."""

from __future__ import annotations

import logging
import os
import traceback
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ditserve.config import OmniDiffusionConfig
from ditserve.engine.scheduler import StepPlan
from ditserve.parallel.channel import ControlChannel, MessageKind, report_error, started_key
from ditserve.parallel.rank import RankRunner, backend_for, rank_device
from ditserve.parallel.sharding import SequenceSplitError
from ditserve.parallel.topology import build_topology

logger = logging.getLogger(__name__)


def cpu_threads_per_rank(world_size: int) -> int:
    """Ranks sharing a CPU split its cores: more threads than cores makes every rank slower."""
    return max(1, (os.cpu_count() or 1) // world_size)


def start_rank(config: OmniDiffusionConfig, store: Any, rank: int, world_size: int, local_rank: int) -> RankRunner:
    device = rank_device(config.device, local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend_for(device), store=dist.PrefixStore("ditserve/pg", store), rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=config.parallel_config.timeout_s))
    topology = build_topology(config.parallel_config, rank)
    return RankRunner(config, topology, local_rank)


#: errors every rank raises at the same point of a step (a sequence that does not divide): the group is still
#: in step afterwards, so the ranks go on with the next step
AGREED_ERRORS = (SequenceSplitError,)


def serve(runner: RankRunner, channel: ControlChannel) -> None:
    """Run the steps rank 0 plans until it says stop. An error every rank raises at the same point (the step's
    running set is then failed everywhere) leaves the group usable."""
    while True:
        message = channel.receive()
        if message.kind is MessageKind.STOP:
            return
        try:
            runner.step(StepPlan(admit=[spec.to_request() for spec in message.specs], drop=message.drop,
                                 run=message.run))
        except AGREED_ERRORS:
            continue


def run_worker(config: OmniDiffusionConfig, store: Any, secret: bytes, rank: int, world_size: int,
               local_rank: int) -> None:
    try:
        runner = start_rank(config, store, rank, world_size, local_rank)
        dist.barrier()  # rank 0 waits here until every rank has loaded its model
        serve(runner, ControlChannel(store, secret, readers=world_size - 1))
        runner.close()
    except BaseException:
        report_error(store, secret, rank, traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def worker_main(rank: int, world_size: int, config: OmniDiffusionConfig, host: str, port: int,
                secret: bytes) -> None:
    """Entry of a spawned worker process (one machine: local rank = rank). The control secret comes with
    the spawn arguments (a pipe from the parent), never through the store."""
    if rank_device(config.device, rank) == "cpu":
        torch.set_num_threads(cpu_threads_per_rank(world_size))
    store = dist.TCPStore(host, port, world_size, is_master=False,
                          timeout=timedelta(seconds=config.parallel_config.timeout_s))
    store.set(started_key(rank), b"1")
    run_worker(config, store, secret, rank, world_size, local_rank=rank)
