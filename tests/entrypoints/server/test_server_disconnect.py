"""A client that goes away has its request aborted: the transformer stops being called within a step."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest

from ditserve.engine.engine import DiffusionEngine
from ditserve.entrypoints.server.thread import ServerThread

LONG_RUN = {"prompt": "a very long job", "size": "64x64", "num_inference_steps": 400}


class ForwardCounter:
    """Counts real transformer calls (a forward pre-hook fires once per denoising step and branch)."""

    def __init__(self, module: Any) -> None:
        self.calls = 0
        self._lock = threading.Lock()
        self._handle = module.register_forward_pre_hook(self._count)

    def _count(self, *_: Any) -> None:
        with self._lock:
            self.calls += 1

    def remove(self) -> None:
        self._handle.remove()


def wait_until(condition: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def test_disconnect_aborts_within_a_step(image_server: ServerThread, image_engine: DiffusionEngine) -> None:
    counter = ForwardCounter(image_engine.adapter.pipeline.transformer)
    try:
        with pytest.raises(httpx.ReadTimeout):
            # the client gives up after a second, closing its connection mid-generation
            httpx.post(f"{image_server.url}/v1/images/generations", json=LONG_RUN, timeout=1.0)
        wait_until(lambda: counter.calls > 0, timeout_s=10)
        time.sleep(0.5)  # the server polls for the disconnect, then the loop stops before its next step
        stopped_at = counter.calls
        time.sleep(1.0)
        assert counter.calls == stopped_at, "the transformer kept running after the client left"
        assert stopped_at < LONG_RUN["num_inference_steps"] // 2
        metrics = httpx.get(f"{image_server.url}/metrics").text
        assert 'ditserve_failed_requests_total{error="RequestAbortedError"}' in metrics
        assert 'status="499"' in metrics
    finally:
        counter.remove()


def test_full_queue_answers_429_not_a_hang(tiny_flux_dir: str, tmp_path: Any, serve: Any) -> None:
    from ditserve.config import OmniDiffusionConfig

    engine = DiffusionEngine(OmniDiffusionConfig(model=tiny_flux_dir, max_batch_size=1, max_queue_size=1,
                                                 limits={"max_steps": 400, "max_image_size": 64}))
    server = serve(engine, tmp_path)
    counter = ForwardCounter(engine.adapter.pipeline.transformer)
    url = f"{server.url}/v1/images/generations"
    timed_out: list[bool] = []

    def give_up_after_3s() -> None:
        try:
            httpx.post(url, json=LONG_RUN, timeout=3.0)
        except httpx.ReadTimeout:
            timed_out.append(True)

    try:
        # one request runs, one waits in the single queue slot; both clients give up after 3 s (aborting both)
        running = threading.Thread(target=give_up_after_3s)
        running.start()
        wait_until(lambda: counter.calls > 0, timeout_s=10)
        waiting = threading.Thread(target=give_up_after_3s)
        waiting.start()
        wait_until(lambda: engine.queue_depth() == 1, timeout_s=10)
        started = time.monotonic()
        refused = httpx.post(url, json=LONG_RUN, timeout=10)
        assert refused.status_code == 429 and time.monotonic() - started < 5  # refused, not queued
        assert refused.json()["error"]["code"] == "queue_full" and refused.headers["retry-after"]
        running.join()
        waiting.join()
        assert timed_out == [True, True]
        wait_until(lambda: engine.queue_depth() == 0, timeout_s=10)
    finally:
        counter.remove()
        server.stop()
        engine.close()
