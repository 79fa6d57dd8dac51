"""Load: 48 small requests at concurrency 16 with batching on, then a shorter run with batching off (same
test, same tiny model): nothing lost, no 5xx; the throughput of both runs is printed.

``DITSERVE_LOAD_REQUESTS`` / ``DITSERVE_LOAD_UNBATCHED_REQUESTS`` change the counts (e.g. 1000 on a fast
machine). The client, the server and the engine share one process and its GIL here, so the req/s are a
lower bound of what a separate server process gives.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import openai
import pytest

from ditserve.entrypoints.server.thread import ServerThread

REQUESTS = int(os.environ.get("DITSERVE_LOAD_REQUESTS", "48"))
#: the unbatched run only measures throughput, so fewer requests keep the test short
UNBATCHED_REQUESTS = int(os.environ.get("DITSERVE_LOAD_UNBATCHED_REQUESTS", "16"))
CONCURRENCY = 16


async def fire(server: ServerThread, count: int) -> tuple[Counter[str], float, Counter[int]]:
    """``count`` requests, at most CONCURRENCY in flight; returns outcomes, seconds, and batch sizes seen."""
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    gate = asyncio.Semaphore(CONCURRENCY)
    outcomes: Counter[str] = Counter()
    batch_sizes: Counter[int] = Counter()

    async def one(index: int) -> None:
        async with gate:
            try:
                result = await client.images.generate(
                    prompt=f"dot number {index}", size="64x64",
                    extra_body={"num_inference_steps": 2, "seed": index})
            except openai.APIStatusError as error:
                outcomes[f"http {error.status_code}"] += 1
                return
            except openai.APIError:
                outcomes["lost"] += 1
                return
            outcomes["ok" if result.data and result.data[0].b64_json else "empty"] += 1
            batch_sizes[int(result.model_extra["timings"]["batch_size"])] += 1

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    seconds = time.perf_counter() - start
    await client.close()
    return outcomes, seconds, batch_sizes


def test_load_with_and_without_batching(image_server: ServerThread, unbatched_server: ServerThread,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    runs = (("batching on", image_server, REQUESTS), ("batching off", unbatched_server, UNBATCHED_REQUESTS))
    results = {}
    for label, server, count in runs:
        asyncio.run(fire(server, 4))  # warm-up: first-call costs out of the measurement
        results[label] = (count, *asyncio.run(fire(server, count)))
    for label, (count, outcomes, _seconds, _batch_sizes) in results.items():
        assert outcomes == Counter({"ok": count}), (label, outcomes)
    assert max(results["batching on"][3]) > 1, "concurrent compatible requests never shared a batch"
    assert set(results["batching off"][3]) == {1}
    with capsys.disabled():
        for label, (count, _outcomes, seconds, batch_sizes) in results.items():
            print(f"\n[load] {label}: {count} requests (64x64, 2 steps, concurrency {CONCURRENCY}) in "
                  f"{seconds:.1f} s = {count / seconds:.1f} req/s; batch sizes {dict(sorted(batch_sizes.items()))}")
