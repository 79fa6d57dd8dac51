"""Multi-machine runs with torchrun: one command on every machine, rank 0 serves, the others work.

    # on each of 2 machines with 4 GPUs (same command and the same secret; --node-rank 0 / 1):
    export DITSERVE_CONTROL_SECRET=<the same 64 hex digits everywhere>
    torchrun --nnodes 2 --nproc-per-node 4 --node-rank 0 \\
        --rdzv-backend c10d --rdzv-endpoint head-node:29500 \\
        -m ditserve.parallel.launch serve --model Qwen/Qwen-Image --cfg-parallel-size 2 --usp 4

Rank 0 runs the ``ditserve`` command line given after the module (serve or generate); its engine finds
torchrun's environment and, instead of spawning workers, hosts a small control store on MASTER_ADDR at
MASTER_PORT + 1 (``DITSERVE_CONTROL_PORT`` overrides it) where it publishes the engine config and, later, the
batches, each sealed with ``DITSERVE_CONTROL_SECRET`` (see ``channel``). Every other rank reads the config from
there and runs the worker loop. The product of the degrees must equal torchrun's world size.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import torch.distributed as dist

from ditserve.errors import ParallelConfigError
from ditserve.parallel.channel import CONFIG_KEY, get_object, secret_from_env
from ditserve.parallel.runner import control_store_address, torchrun_rank
from ditserve.parallel.worker import run_worker

#: how long a worker waits for rank 0 to publish the engine config (rank 0 may first parse and validate)
CONFIG_WAIT = timedelta(minutes=10)


def run_torchrun_worker(secret: bytes, rank: int, world_size: int, local_rank: int) -> None:
    host, port = control_store_address()
    store = dist.TCPStore(host, port, world_size, is_master=False, timeout=CONFIG_WAIT)
    store.wait([CONFIG_KEY], CONFIG_WAIT)
    config = get_object(store, secret, CONFIG_KEY)
    run_worker(config, store, secret, rank, world_size, local_rank)


def main(argv: list[str] | None = None) -> int:
    launched = torchrun_rank()
    if launched is None:
        sys.stderr.write("ditserve.parallel.launch must be started by torchrun (see its module docstring)\n")
        return 2
    try:
        # checked on every rank before anything starts: a rank without the secret could not read a message
        secret = secret_from_env()
    except ParallelConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    rank, world_size, local_rank = launched
    if rank == 0:
        from ditserve.entrypoints.cli import main as cli_main

        return cli_main(argv) or 0
    run_torchrun_worker(secret, rank, world_size, local_rank)
    return 0


if __name__ == "__main__":
    sys.exit(main())
