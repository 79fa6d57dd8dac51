"""One 2-rank gloo group that runs every (family, method) case on fresh rank runners, so that all the parity
checks share one worker start-up (about 7 s of imports). Rank 0 is the calling (pytest) process; rank 1 is a
spawned process running the same cases. Rank 0 returns each case's final latents. A larger ``world_size``
serves the by-hand checks of combined methods (4 ranks)."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ditserve.config import DiffusionParallelConfig, OmniDiffusionConfig, OmniDiffusionSamplingParams
from ditserve.engine.runner import ModelRunner
from ditserve.parallel.rank import RankRunner
from ditserve.parallel.topology import build_topology
from ditserve.parallel.worker import cpu_threads_per_rank
from ditserve.request import Request

WORLD_SIZE = 2
TIMEOUT = timedelta(seconds=60)


@dataclass(frozen=True)
class Case:
    name: str
    model_dir: str
    parallel: dict[str, int]
    prompt: str
    params: dict[str, Any]
    #: (cache_backend, cache_config) or None
    cache: tuple[str, dict[str, Any]] | None = None
    #: input images (PIL) of image-conditioned models
    images: tuple[Any, ...] = ()

    def engine_config(self, parallel: dict[str, int]) -> OmniDiffusionConfig:
        backend, cache_config = self.cache if self.cache is not None else (None, None)
        return OmniDiffusionConfig(model=self.model_dir, device="cpu", cache_backend=backend,
                                   cache_config=cache_config, parallel_config=DiffusionParallelConfig(**parallel))


@dataclass
class CaseResult:
    latents: torch.Tensor
    cache_stats: dict[str, Any] | None
    #: parameters rank 0 holds in its denoising transformers (tensor parallelism must shrink it)
    transformer_parameters: int


def _transformer_parameters(runner: ModelRunner) -> int:
    return sum(p.numel() for transformer in runner.adapter.transformers() for p in transformer.parameters())


def _capture_final_latents(runner: ModelRunner) -> list[torch.Tensor]:
    captured: list[torch.Tensor] = []
    decode = runner.adapter.decode

    def capturing_decode(state: Any) -> Any:
        captured.append(state.latents.detach().clone())
        return decode(state)

    runner.adapter.decode = capturing_decode
    return captured


def _request(runner: ModelRunner, case: Case) -> Request:
    params = runner.adapter.resolve_params(OmniDiffusionSamplingParams(**case.params))
    request = Request(prompt=case.prompt, params=params, images=list(case.images), request_id=f"req-{case.name}")
    # as the engine does: params that depend on the inputs (an edit model's output size)
    request.params = runner.adapter.complete_params(request)
    return request


def single_process_run(case: Case) -> CaseResult:
    runner = ModelRunner(case.engine_config({}))
    captured = _capture_final_latents(runner)
    output = runner.execute([_request(runner, case)])[0]
    result = CaseResult(captured[0], output.cache_stats, _transformer_parameters(runner))
    runner.close()
    return result


def run_cases(rank: int, port: int, cases: list[Case], world_size: int = WORLD_SIZE) -> dict[str, CaseResult]:
    # ranks share the cores: more threads than cores make every collective wait for a descheduled rank
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(cpu_threads_per_rank(world_size))
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=rank == 0, timeout=TIMEOUT,
                          wait_for_workers=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=TIMEOUT)
    results = {}
    try:
        for case in cases:
            config = case.engine_config(case.parallel)
            runner = RankRunner(config, build_topology(config.parallel_config, rank), local_rank=rank)
            captured = _capture_final_latents(runner)
            output = runner.execute([_request(runner, case)])[0]
            if rank == 0:
                results[case.name] = CaseResult(captured[0], output.cache_stats, _transformer_parameters(runner))
            runner.close()
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(saved_threads)
    return results


def run_parity_group(cases: list[Case], world_size: int = WORLD_SIZE) -> tuple[dict[str, CaseResult], int | None]:
    """Run ``cases`` on ``world_size`` ranks; returns rank 0's latents per case and the workers' worst exit
    code (0 when every worker exited cleanly)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=run_cases, args=(rank, port, cases, world_size), daemon=True)
               for rank in range(1, world_size)]
    for worker in workers:
        worker.start()
    try:
        results = run_cases(0, port, cases, world_size)
    finally:
        for worker in workers:
            worker.join(timeout=60)
    codes = [worker.exitcode for worker in workers]
    return results, next((code for code in codes if code != 0), 0)
