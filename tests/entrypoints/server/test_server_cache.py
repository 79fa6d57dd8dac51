"""A server with a cache backend reports each request's cache work, and /metrics sums it."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import httpx
import pytest

from ditserve.config import OmniDiffusionConfig
from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server.thread import ServerThread

STEPS = 6


@pytest.fixture(scope="module")
def cached_server(tiny_flux_dir: str, tmp_path_factory: pytest.TempPathFactory,
                  serve: Callable[..., ServerThread]) -> Iterator[ServerThread]:
    # random weights change a lot between steps: only a huge threshold makes TeaCache skip
    engine = DiffusionEngine(OmniDiffusionConfig(model=tiny_flux_dir, cache_backend="tea_cache",
                                                 cache_config={"rel_l1_thresh": 10.0}))
    server = serve(engine, tmp_path_factory.mktemp("cached-server"))
    yield server
    server.stop()
    engine.close()


def metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{name}\{{{labels}\}} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_cache_statistics_in_responses_and_metrics(cached_server: ServerThread) -> None:
    body = {"prompt": "a cached dot", "size": "64x64", "num_inference_steps": STEPS, "seed": 1}
    stats = [httpx.post(f"{cached_server.url}/v1/images/generations", json=body, timeout=60).json()["cache_stats"]
             for _ in range(2)]
    for one in stats:
        assert one["backend"] == "tea_cache" and one["computed_steps"] + one["skipped_steps"] == STEPS
    assert [s["prompt_embed"]["outcome"] for s in stats] == ["miss", "hit"]
    text = httpx.get(f"{cached_server.url}/metrics").text
    assert metric(text, "ditserve_cache_steps_total", 'decision="skipped"') == sum(s["skipped_steps"] for s in stats)
    assert metric(text, "ditserve_cache_steps_total", 'decision="computed"') == sum(s["computed_steps"]
                                                                                      for s in stats)
    assert metric(text, "ditserve_prompt_embed_cache_total", 'outcome="hit"') == 1
    assert sum(s["skipped_steps"] for s in stats) > 0
