"""Scaling of the parallel methods on this machine: one FLUX-architecture transformer forward, single process
against 2 ranks, with the time spent in collectives measured separately (torch.profiler).

    python -m ditserve.parallel.bench --tokens 1024 --repeats 5

Methods (``--methods``, all by default): CFG-parallel, Ulysses, ring, and tensor parallelism (the blocks'
weights split over the 2 ranks; its collectives are the all-reduces after each row-split linear). Prints per
method: seconds of one step on 2 ranks (1 thread each; fastest of the repeats), the part of it in
collectives, and the speed-up over one process with 2 threads (the same 2 cores: intra-op threading already
uses them, so ~1x is the expected best here) and with 1 thread (one rank's device alone: the figure that
carries over to one GPU per rank). The transformer is built in memory with random weights (hidden 256,
2 double + 4 single blocks, 4 heads of 64): the size the platform notes time.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.profiler import ProfilerActivity, profile

from ditserve.config import DiffusionParallelConfig
from ditserve.parallel.cfg import CfgParallelStep
from ditserve.parallel.families.flux import FluxPlan
from ditserve.parallel.tensor import SplitInstall
from ditserve.parallel.topology import build_topology

TEXT_TOKENS = 64
METHODS = ("cfg", "ulysses", "ring", "tp")
DEGREES = {"cfg": {"cfg_parallel_size": 2}, "ulysses": {"ulysses_degree": 2}, "ring": {"ring_degree": 2},
           "tp": {"tensor_parallel_size": 2}}
#: profiler events that are communication (their CPU time includes waiting for the peer)
COMMUNICATION_MARKERS = ("c10d", "gloo", "nccl", "all_to_all", "all_gather", "all_reduce", "allreduce", "broadcast",
                         "send", "recv", "wait")


def build_transformer() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                  attention_head_dim=64, num_attention_heads=4, joint_attention_dim=256,
                                  pooled_projection_dim=256, guidance_embeds=False,
                                  axes_dims_rope=(16, 24, 24)).eval()


def make_inputs(tokens: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(1)
    side = int(tokens ** 0.5)
    image_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(),
                                           torch.arange(tokens // side).float(),
                                           indexing="ij"), dim=-1).reshape(-1, 3).float()
    return {"hidden_states": torch.randn(1, tokens, 64, generator=generator),
            "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, 256, generator=generator),
            "pooled_projections": torch.randn(1, 256, generator=generator), "timestep": torch.tensor([0.5]),
            "img_ids": image_ids, "txt_ids": torch.zeros(TEXT_TOKENS, 3), "return_dict": False}


def _communication_seconds(prof: Any) -> float:
    events = prof.key_averages()
    return sum(e.cpu_time_total for e in events
               if any(marker in e.key.lower() for marker in COMMUNICATION_MARKERS)) / 1e6


def fastest_seconds(run: Any, repeats: int) -> float:
    """Fastest of ``repeats`` timed runs after a warm-up. The fastest, not the median: on a shared machine
    the slow runs measure the neighbours, not the code."""
    run()
    times = []
    for _ in range(repeats):
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def communication_share(run: Any) -> float:
    """Share of one profiled run spent in collectives (waiting for the peer included)."""
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run()
        total = time.perf_counter() - start
    return min(1.0, _communication_seconds(prof) / total)


def _cfg_step(transformer: torch.nn.Module, inputs: dict[str, Any], topology: Any) -> Any:
    """One guided step under CFG-parallel: each rank computes one branch, then the pair exchanges."""
    step = CfgParallelStep(topology)
    shape = FluxPlan().output_shape(transformer, inputs)
    cond = step.call(lambda: transformer(**inputs)[0], "cond", "transformer",
                     lambda: torch.empty(shape, dtype=transformer.dtype))
    uncond = step.call(lambda: transformer(**inputs)[0], "uncond", "transformer",
                       lambda: torch.empty(shape, dtype=transformer.dtype))
    return uncond + 4.0 * (cond - uncond)


def rank_main(rank: int, port: int, method: str, tokens: int, repeats: int, results: Any) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=300))
    topology = build_topology(DiffusionParallelConfig(**DEGREES[method]), rank)
    transformer, inputs = build_transformer(), make_inputs(tokens)
    if method == "cfg":
        def run() -> Any:
            return _cfg_step(transformer, inputs, topology)
    else:
        if method == "tp":
            FluxPlan().split_tensor_parallel(transformer, SplitInstall(topology.tp_rank, topology.tp_size,
                                                                       topology.tp_group))
        else:
            FluxPlan().install(transformer, topology)

        def run() -> Any:
            return transformer(**inputs)
    with torch.inference_mode():
        seconds = fastest_seconds(run, repeats)
        share = communication_share(run)
    if rank == 0:
        results.put((seconds, seconds * share))
    dist.destroy_process_group()


def single_process_forward(tokens: int, repeats: int, threads: int) -> float:
    """One forward in this process: with 2 threads it uses both cores, as the 2 ranks together do; with 1
    thread it is one rank's device alone (the baseline that carries over to one GPU per rank)."""
    torch.set_num_threads(threads)
    transformer, inputs = build_transformer(), make_inputs(tokens)
    with torch.inference_mode():
        return fastest_seconds(lambda: transformer(**inputs), repeats)


def measure(method: str, tokens: int, repeats: int) -> tuple[float, float]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    processes = [context.Process(target=rank_main, args=(rank, port, method, tokens, repeats, results))
                 for rank in range(2)]
    for process in processes:
        process.start()
    seconds, comm = results.get()
    for process in processes:
        process.join()
    return seconds, comm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args()
    report = {}
    forward = single_process_forward(args.tokens, args.repeats, threads=2)
    forward_one_core = single_process_forward(args.tokens, args.repeats, threads=1)
    for method in args.methods:
        seconds, comm = measure(method, args.tokens, args.repeats)
        # re-measured between methods: keep the fastest, the least disturbed by the neighbours
        forward = min(forward, single_process_forward(args.tokens, args.repeats, threads=2))
        forward_one_core = min(forward_one_core, single_process_forward(args.tokens, args.repeats, threads=1))
        calls = 2 if method == "cfg" else 1  # a guided step is two forwards
        report[method] = {"one_process_2_threads_s": round(calls * forward, 4),
                          "one_process_1_thread_s": round(calls * forward_one_core, 4),
                          "two_ranks_s": round(seconds, 4), "communication_s": round(comm, 4),
                          "speedup_vs_2_threads": round(calls * forward / seconds, 2),
                          "speedup_vs_1_thread": round(calls * forward_one_core / seconds, 2)}
        print(method, json.dumps(report[method]), flush=True)
    print(json.dumps({"tokens": args.tokens, "text_tokens": TEXT_TOKENS, **report}, indent=1))


if __name__ == "__main__":
    main()
