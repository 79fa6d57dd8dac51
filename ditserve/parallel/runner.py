"""``MultiProcessRunner``: the engine's runner when the parallel config asks for several ranks.

The engine process is rank 0: it loads its own copy of the model, so ``.adapter`` (validation, batch keys,
kind) is a real adapter, and it decodes the images. Ranks 1..N-1 are worker processes: spawned here on one
machine, or started by torchrun on several (see ``ditserve.parallel.launch``). Before every step rank 0 sends
the step's plan through the store: the admitted requests (prompt, params, images, ids) and the dropped ids; every
rank encodes the admitted prompts and prepares the same latents from the same seeds, runs the step on its part
(its CFG branch, its sequence shard), and rank 0 decodes the requests that finished.

Failures: collectives time out after ``timeout_s``, and gloo/NCCL fail at once when a peer's process is gone.
Any failure other than an agreed one leaves the group in an unknown state, so the runner stops every rank
and answers this and every later step with ``EngineClosedError`` naming the rank and its error.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ditserve.config import OmniDiffusionConfig
from ditserve.engine.runner import StepOutcome, run_cohort
from ditserve.engine.scheduler import StepPlan
from ditserve.errors import EngineClosedError, ParallelConfigError
from ditserve.parallel.channel import (
    CONFIG_KEY,
    ControlChannel,
    Message,
    MessageKind,
    host_store,
    new_secret,
    put_object,
    reported_errors,
    secret_from_env,
    started_key,
)
from ditserve.parallel.rank import RankRunner, RequestSpec, rank_device
from ditserve.parallel.worker import AGREED_ERRORS, cpu_threads_per_rank, start_rank, worker_main
from ditserve.request import Request, RequestOutput

logger = logging.getLogger(__name__)

#: how long rank 0 waits for dying workers to write their error report before it describes the failure
DIAGNOSE_WAIT_S = 2.0
#: how long ``close`` waits for workers to exit on their own before it terminates them
EXIT_WAIT_S = 10.0
#: where the control store of spawned workers listens: they run on this machine, so nothing else may reach it
SPAWN_HOST = "127.0.0.1"


def torchrun_rank() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when this process was started by torchrun, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])


def control_store_address() -> tuple[str, int]:
    """Under torchrun: the control store lives next to torchrun's rendezvous (MASTER_PORT + 1 by default)."""
    host = os.environ["MASTER_ADDR"]
    port = int(os.environ.get("DITSERVE_CONTROL_PORT", int(os.environ["MASTER_PORT"]) + 1))
    return host, port


def _describe_exit(process: multiprocessing.process.BaseProcess) -> str:
    code = process.exitcode
    if code is not None and code < 0:
        return f"killed by signal {signal.Signals(-code).name}"
    return f"exit code {code}"


class MultiProcessRunner:
    def __init__(self, config: OmniDiffusionConfig) -> None:
        self.config = config
        parallel = config.parallel_config
        if dist.is_initialized():
            raise ParallelConfigError(
                "torch.distributed is already initialised in this process (another parallel engine, or your own "
                "process group): close it first; one parallel engine per process", param="parallel_config")
        self.world_size = parallel.world_size
        self._device = rank_device(config.device, 0)
        self._workers: list[multiprocessing.process.BaseProcess] = []
        self._broken: str | None = None
        self._saved_threads = torch.get_num_threads()
        launched = torchrun_rank()
        if launched is not None:
            self._secret = secret_from_env()
            self._store = self._join_torchrun(launched)
        else:
            self._secret = new_secret()
            self._store = self._spawn_workers()
        try:
            self._wait_for_workers_to_start()
            self.local: RankRunner = start_rank(config, self._store, 0, self.world_size, 0)
            dist.barrier()
        except BaseException as error:
            reason = self._describe_failure(error)
            self._teardown()
            if isinstance(error, ParallelConfigError):
                raise
            raise EngineClosedError(f"parallel start-up failed: {reason}") from error
        self.adapter = self.local.adapter
        #: per-request LoRAs would need every rank to load the same adapters; the config refuses them
        self.loras = None
        self.channel = ControlChannel(self._store, self._secret, readers=self.world_size - 1)
        logger.info("parallel runner ready: %d ranks (%s)", self.world_size, parallel)

    # ------------------------------------------------------------------ start-up
    def _spawn_workers(self) -> Any:
        timeout = timedelta(seconds=self.config.parallel_config.timeout_s)
        store = host_store(SPAWN_HOST, 0, self.world_size, timeout)
        if self._device == "cpu":
            torch.set_num_threads(cpu_threads_per_rank(self.world_size))
        context = multiprocessing.get_context("spawn")
        for rank in range(1, self.world_size):
            process = context.Process(target=worker_main, name=f"ditserve-rank{rank}", daemon=True,
                                      args=(rank, self.world_size, self.config, SPAWN_HOST, store.port,
                                            self._secret))
            process.start()
            self._workers.append(process)
        return store

    def _wait_for_workers_to_start(self) -> None:
        """A worker that dies while importing (e.g. a script without ``if __name__ == "__main__":``) must fail
        start-up now, not after ``timeout_s`` inside the process-group rendezvous."""
        deadline = time.monotonic() + self.config.parallel_config.timeout_s
        for rank, process in enumerate(self._workers, start=1):
            while not self._store.check([started_key(rank)]):
                if not process.is_alive():
                    raise EngineClosedError(f"rank {rank} (pid {process.pid}) died while starting: "
                                            f"{_describe_exit(process)}")
                if time.monotonic() > deadline:
                    raise EngineClosedError(f"rank {rank} did not start within timeout_s")
                time.sleep(0.05)

    def _join_torchrun(self, launched: tuple[int, int, int]) -> Any:
        rank, world_size, _local_rank = launched
        if rank != 0:
            raise ParallelConfigError("under torchrun only rank 0 builds the engine; start the others with "
                                      "`python -m ditserve.parallel.launch`", param="parallel_config")
        if world_size != self.world_size:
            raise ParallelConfigError(
                f"torchrun started {world_size} processes but the parallel config needs {self.world_size} "
                "(cfg_parallel_size x ulysses_degree x ring_degree x tensor_parallel_size)", param="parallel_config")
        host, port = control_store_address()
        store = host_store(host, port, world_size, timedelta(seconds=self.config.parallel_config.timeout_s))
        put_object(store, self._secret, CONFIG_KEY, self.config)
        return store

    # ------------------------------------------------------------------ steps
    @property
    def steps_in_loop(self) -> bool:
        return self.local.steps_in_loop

    @property
    def joins_running_batch(self) -> bool:
        return self.local.joins_running_batch

    def validate_request(self, request: Request) -> None:
        self.local.validate_request(request)

    def step(self, plan: StepPlan) -> StepOutcome:
        """Send the plan to every rank, then run the step here (rank 0 decodes and answers)."""
        if self._broken is not None:
            raise EngineClosedError(f"the parallel runner stopped after a failure: {self._broken}")
        dead = self._dead_workers()
        if dead:
            self._fail(dead)
        self.channel.send(Message(MessageKind.STEP, [RequestSpec.of(r) for r in plan.admit], list(plan.drop),
                                  plan.run))
        try:
            return self.local.step(plan)
        except AGREED_ERRORS:
            raise  # every rank raised it at the same point: the group is still in step
        except BaseException as error:
            self._fail(self._describe_failure(error), error)

    def execute(self, batch: Sequence[Request]) -> list[RequestOutput]:
        """Run ``batch`` as one cohort, start to end, on every rank."""
        return run_cohort(self.step, batch)

    def _fail(self, reason: str, error: BaseException | None = None) -> None:
        self._broken = reason
        logger.error("parallel run failed: %s", reason)
        self._teardown()
        raise EngineClosedError(f"parallel run failed: {reason}") from error

    # ------------------------------------------------------------------ diagnosis
    def _dead_workers(self) -> str:
        return "; ".join(f"rank {rank} (pid {p.pid}) died: {_describe_exit(p)}"
                         for rank, p in enumerate(self._workers, start=1) if not p.is_alive())

    def _describe_failure(self, error: BaseException) -> str:
        """Name the rank that failed: a dead worker, or a worker's error report, or else the local error."""
        deadline = time.monotonic() + DIAGNOSE_WAIT_S
        errors: dict[int, str] = {}
        while time.monotonic() < deadline:
            errors = reported_errors(self._store, self._secret, range(1, self.world_size))
            if errors or self._dead_workers():
                break
            time.sleep(0.1)
        parts = [f"rank {rank} failed: {text.strip().splitlines()[-1]}" for rank, text in errors.items()]
        dead = self._dead_workers()
        if dead:
            parts.append(dead)
        parts.append(f"rank 0 saw {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}")
        return "; ".join(parts)

    # ------------------------------------------------------------------ shutdown
    def _teardown(self) -> None:
        for process in self._workers:
            process.join(timeout=0.1)
            if process.is_alive():
                process.terminate()
        for process in self._workers:
            process.join(timeout=EXIT_WAIT_S)
            if process.is_alive():
                process.kill()
                process.join(timeout=EXIT_WAIT_S)
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._saved_threads)

    def close(self) -> None:
        if self._broken is None:
            self._broken = "the runner was closed"
            self.channel.send(Message(MessageKind.STOP))
            for process in self._workers:
                process.join(timeout=EXIT_WAIT_S)
        self.local.close()
        self._teardown()

