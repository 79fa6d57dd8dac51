"""The engine loop: validate and queue requests, run batches on a background thread, resolve futures.

Offline generation (``Omni``) and the HTTP server share this one path. Requests are resolved (family
defaults, seed drawn, limits checked) when they are added, so bad input fails before it waits in a queue.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from PIL import Image

from ditserve.config import OmniDiffusionConfig, OmniDiffusionSamplingParams
from ditserve.engine.request import Request, RequestOutput, new_request_id
from ditserve.engine.scheduler import BatchScheduler
from ditserve.errors import (
    EngineClosedError,
    InvalidParameterError,
    InvalidTypeError,
    RequestAbortedError,
    check_text,
)

logger = logging.getLogger(__name__)

#: called after every batch with (batch, outputs or the exception, wall seconds)
BatchObserver = Callable[[Sequence[Request], "list[RequestOutput] | BaseException", float], None]


def make_runner(config: OmniDiffusionConfig) -> Any:
    if config.parallel_config.world_size > 1:
        from ditserve.parallel.runner import MultiProcessRunner

        return MultiProcessRunner(config)
    from ditserve.engine.runner import ModelRunner

    return ModelRunner(config)


class DiffusionEngine:
    def __init__(self, config: OmniDiffusionConfig, runner: Any | None = None) -> None:
        self.config = config
        self.runner = runner if runner is not None else make_runner(config)
        self.adapter = self.runner.adapter
        self.scheduler = BatchScheduler(self.adapter.batch_key, config.max_batch_size, config.max_queue_size)
        self.observers: list[BatchObserver] = []
        self._active: dict[str, Request] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="ditserve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests
    def make_request(self, prompt: Any, params: OmniDiffusionSamplingParams | None = None,
                     images: Sequence[Image.Image] = (), request_id: str | None = None,
                     progress_callback: Callable[[int, int], None] | None = None) -> Request:
        """Validate and resolve one request; raises our ValueError/TypeError subclasses on bad input."""
        if not isinstance(prompt, str):
            raise InvalidTypeError(f"prompt must be a string, got {type(prompt).__name__}", param="prompt")
        limits = self.config.limits
        check_text("prompt", prompt, limits.max_prompt_chars)
        params = params if params is not None else OmniDiffusionSamplingParams()
        if not isinstance(params, OmniDiffusionSamplingParams):
            raise InvalidTypeError("sampling params must be an OmniDiffusionSamplingParams or a dict",
                                   param="sampling_params")
        if params.negative_prompt is not None:
            # checked as given, before any work: a family's own default negative prompt is not the caller's
            check_text("negative_prompt", params.negative_prompt, limits.max_negative_prompt_chars)
        images = list(images)
        for image in images:
            if not isinstance(image, Image.Image):
                raise InvalidTypeError(f"input images must be PIL images, got {type(image).__name__}",
                                       param="image")
        self.adapter.validate_inputs(images)
        resolved = self.adapter.resolve_params(params)
        if resolved.seed is None:
            resolved = resolved.replace(seed=secrets.randbelow(2**32))
        request = Request(prompt=prompt, params=resolved, images=images,
                          request_id=request_id or new_request_id(), progress_callback=progress_callback)
        request.params = self.adapter.complete_params(request)
        self._check_limits(request.params)
        return request

    def _check_limits(self, params: OmniDiffusionSamplingParams) -> None:
        limits = self.config.limits
        bounds = (("num_inference_steps", params.num_inference_steps, limits.max_steps),
                  ("height", params.height, limits.max_image_size),
                  ("width", params.width, limits.max_image_size),
                  ("num_outputs_per_prompt", params.num_outputs_per_prompt, limits.max_n),
                  ("num_frames", params.num_frames, limits.max_frames))
        for name, value, limit in bounds:
            if value is not None and value > limit:
                raise InvalidParameterError(f"{name}={value} is over this engine's limit of {limit}", param=name)

    def submit(self, request: Request) -> Future:
        if self._closed:
            raise EngineClosedError("the engine is closed")
        with self._lock:
            self._active[request.request_id] = request
        self.scheduler.add(request)
        request.future.add_done_callback(lambda _f: self._forget(request.request_id))
        return request.future

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._active.pop(request_id, None)

    def abort(self, request_id: str) -> bool:
        """Abort a waiting or running request; it stops within one denoising step. False if unknown."""
        with self._lock:
            request = self._active.get(request_id)
        if request is None:
            return False
        request.abort()
        if not request.future.done():
            request.future.set_exception(RequestAbortedError(f"request {request_id} was aborted"))
        self.scheduler.wake()
        return True

    def generate(self, requests: Sequence[Request]) -> list[RequestOutput]:
        """Submit and wait: outputs in the order of ``requests``."""
        futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    def queue_depth(self) -> int:
        return len(self.scheduler)

    def is_alive(self) -> bool:
        """True while the engine accepts and runs requests (not closed, its loop thread running)."""
        return not self._closed and self._thread.is_alive()

    # ------------------------------------------------------------------ loop
    def _loop(self) -> None:
        while not self._closed:
            batch = [r for r in self.scheduler.next_batch(timeout=0.5) if not r.future.done()]
            if batch:
                self._run(batch)

    def _run(self, batch: list[Request]) -> None:
        started_at = time.monotonic()
        start = time.perf_counter()
        try:
            outputs = self.runner.execute(batch)
        except BaseException as error:  # noqa: BLE001 - every failure must reach the waiting callers
            if not isinstance(error, RequestAbortedError):
                logger.exception("batch of %d request(s) failed", len(batch))
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            self._notify(batch, error, time.perf_counter() - start)
            return
        for request, output in zip(batch, outputs, strict=True):
            output.timings["queue_s"] = max(0.0, started_at - request.arrival_time)
            if not request.future.done():
                request.future.set_result(output)
        self._notify(batch, outputs, time.perf_counter() - start)

    def _notify(self, batch: Sequence[Request], result: Any, seconds: float) -> None:
        for observer in self.observers:
            try:
                observer(batch, result, seconds)
            except Exception:  # noqa: BLE001 - metrics must never break generation
                logger.exception("batch observer failed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for request in self.scheduler.close():
            if not request.future.done():
                request.future.set_exception(EngineClosedError("the engine was closed before this request ran"))
        self._thread.join(timeout=30)
        self.runner.close()
