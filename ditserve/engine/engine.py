"""The engine loop: validate and queue requests, run denoising steps on a background thread, resolve futures.

Offline generation (``Omni``) and the HTTP server share this one path. Requests are resolved (family
defaults, seed drawn, limits checked) when they are added, so bad input fails before it waits in a queue.
Each turn of the loop is schedule -> step -> postprocess: the scheduler says who joins and who is dropped, the
runner runs one denoising step for the running set, and the requests that finished (or failed alone) are
answered at once, without waiting for their batch mates.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ditserve.config import OmniDiffusionConfig, OmniDiffusionSamplingParams
from ditserve.engine.scheduler import SchedulingMode, StepPlan, StepScheduler
from ditserve.errors import (
    EngineClosedError,
    InvalidParameterError,
    InvalidTypeError,
    LoRAError,
    RequestAbortedError,
    check_text,
)
from ditserve.lora.request import AppliedLoRA, LoRARequest, check_lora_scale
from ditserve.models.base import LoopAdapter
from ditserve.request import Request, RequestOutput, new_request_id

logger = logging.getLogger(__name__)



@dataclass
class StepReport:
    """What one turn of the engine loop did, for observers (metrics)."""

    #: requests that ran the step (a whole run counts as one step of one request)
    batch_size: int
    seconds: float
    finished: list[tuple[Request, RequestOutput]] = field(default_factory=list)
    failed: list[tuple[Request, BaseException]] = field(default_factory=list)


#: called after every step of the engine loop
StepObserver = Callable[[StepReport], None]


def _with_lora(step_key: Callable[[Request], tuple[Any, ...]]) -> Callable[[Request], tuple[Any, ...]]:
    """A step key that also keeps requests of different LoRAs (or scales) apart."""
    def key(request: Request) -> tuple[Any, ...]:
        return (*step_key(request), ("lora", request.lora))

    return key


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
        step_key = self.adapter.step_key if isinstance(self.adapter, LoopAdapter) else self.adapter.batch_key
        if not self.adapter.lora_per_row:
            step_key = _with_lora(step_key)
        self.scheduler = StepScheduler(step_key, self.adapter.batch_key, config.max_batch_size, config.max_queue_size,
                                       mode=self._scheduling_mode())
        self.observers: list[StepObserver] = []
        self._active: dict[str, Request] = {}
        self._dropped: dict[str, Request] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="ditserve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ requests
    def make_request(self, prompt: Any, params: OmniDiffusionSamplingParams | None = None,
                     images: Sequence[Image.Image] = (), request_id: str | None = None,
                     progress_callback: Callable[[int, int], None] | None = None,
                     lora: LoRARequest | None = None, lora_scale: float | None = None) -> Request:
        """Validate and resolve one request; raises our ValueError/TypeError subclasses on bad input. With
        ``lora``, the adapter is loaded if needed and pinned until the request's future is done (submit the
        request, or cancel its future)."""
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
        self.runner.validate_request(request)
        # last: a request that fails any other check never pins an adapter
        self._attach_lora(request, lora, lora_scale)
        return request

    def _attach_lora(self, request: Request, lora: LoRARequest | None, lora_scale: float | None) -> None:
        if lora is None:
            if lora_scale is not None:
                raise InvalidParameterError("lora_scale was given without a LoRA", param="lora_scale")
            return
        if not isinstance(lora, LoRARequest):
            raise InvalidTypeError(f"lora_request must be a LoRARequest, got {type(lora).__name__}",
                                   param="lora_request")
        scale = check_lora_scale(1.0 if lora_scale is None else lora_scale)
        manager = self.runner.loras
        if manager is None:
            raise LoRAError("this engine takes no per-request LoRA: it runs with lora_backend='distill' (adapters "
                            "fused at start) or on several devices")
        if not self.runner.steps_in_loop:
            raise LoRAError(f"{self.adapter.pipeline_class_name} runs through diffusers' own pipeline call; "
                            "per-request LoRAs need a family that runs in ditserve's step loop")
        name = manager.acquire(lora)
        request.lora = AppliedLoRA(name, scale)
        request.future.add_done_callback(lambda _future: manager.release(name))

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
        if request.admitted_at is not None:
            with self._lock:
                # a running request: kept until the step that drops it reports the abort to observers
                self._dropped[request_id] = request
        if not request.future.done():
            request.future.set_exception(RequestAbortedError(f"request {request_id} was aborted"))
        self.scheduler.wake()
        return True

    def generate(self, requests: Sequence[Request]) -> list[RequestOutput]:
        """Submit and wait: outputs in the order of ``requests``."""
        futures: list[Future] = []
        try:
            for request in requests:
                futures.append(self.submit(request))
        except BaseException:
            for request in requests[len(futures):]:
                request.future.cancel()  # never submitted: releases what it holds (its LoRA)
            raise
        return [f.result() for f in futures]

    def queue_depth(self) -> int:
        return len(self.scheduler)

    def is_alive(self) -> bool:
        """True while the engine accepts and runs requests (not closed, its loop thread running)."""
        return not self._closed and self._thread.is_alive()

    # ------------------------------------------------------------------ loop
    def _scheduling_mode(self) -> SchedulingMode:
        """Step scheduling unless asked otherwise, or unless the model or its cache cannot share steps: the
        generic path runs whole pipeline calls, and a cache that decides for the whole batch needs cohorts."""
        if SchedulingMode(self.config.scheduling) is SchedulingMode.REQUEST or not self.runner.joins_running_batch:
            return SchedulingMode.REQUEST
        return SchedulingMode.STEP

    def _loop(self) -> None:
        while not self._closed:
            plan = self.scheduler.schedule(timeout=0.5)
            if plan is None:
                continue
            admitted_at = time.monotonic()
            for request in plan.admit:
                request.admitted_at = admitted_at
            if self.runner.steps_in_loop:
                self._step(plan)
            else:
                self._run_whole(plan.admit)

    def _step(self, plan: StepPlan) -> None:
        start = time.perf_counter()
        try:
            outcome = self.runner.step(plan)
        except BaseException as error:  # noqa: BLE001 - every failure must reach the waiting callers
            failed = [self._active[rid] for rid in self.scheduler.resident_ids() if rid in self._active]
            logger.exception("a denoising step of %d request(s) failed", len(failed))
            self.scheduler.finish([r.request_id for r in failed])
            for request in failed:
                self._fail(request, error)
            self._notify(StepReport(len(failed), time.perf_counter() - start, failed=[(r, error) for r in failed]))
            return
        report = StepReport(outcome.batch_size, time.perf_counter() - start)
        for request_id in plan.drop:
            with self._lock:
                request = self._dropped.pop(request_id, None)
            if request is not None:
                report.failed.append((request, RequestAbortedError(f"request {request_id} was aborted")))
        for request_id, error in outcome.failed.items():
            request = self._active.get(request_id)
            if request is not None:
                self._fail(request, error)
                report.failed.append((request, error))
        self.scheduler.advance(outcome.progress)
        for request_id, (done, total) in outcome.progress.items():
            request = self._active.get(request_id)
            if request is not None and request.progress_callback is not None:
                request.progress_callback(done, total)
        for output in outcome.finished:
            request = self._active.get(output.request_id)
            if request is not None:
                self._resolve(request, output)
                report.finished.append((request, output))
        self.scheduler.finish([*outcome.failed, *(o.request_id for o in outcome.finished)])
        self._notify(report)

    def _run_whole(self, batch: Sequence[Request]) -> None:
        """Models without a step loop: each request runs its whole pipeline call."""
        for request in batch:
            start = time.perf_counter()
            report = StepReport(1, 0.0)
            try:
                output = self.runner.execute([request])[0]
            except BaseException as error:  # noqa: BLE001 - every failure must reach the waiting caller
                if not isinstance(error, RequestAbortedError):
                    logger.exception("request %s failed", request.request_id)
                self._fail(request, error)
                report.failed.append((request, error))
            else:
                self._resolve(request, output)
                report.finished.append((request, output))
            self.scheduler.finish([request.request_id])
            with self._lock:
                self._dropped.pop(request.request_id, None)  # a whole run reports its own abort (above)
            report.seconds = time.perf_counter() - start
            self._notify(report)

    def _resolve(self, request: Request, output: RequestOutput) -> None:
        output.timings["queue_s"] = max(0.0, (request.admitted_at or request.arrival_time) - request.arrival_time)
        if not request.future.done():
            request.future.set_result(output)

    @staticmethod
    def _fail(request: Request, error: BaseException) -> None:
        if not request.future.done():
            request.future.set_exception(error)

    def _notify(self, report: StepReport) -> None:
        for observer in self.observers:
            try:
                observer(report)
            except Exception:  # noqa: BLE001 - metrics must never break generation
                logger.exception("step observer failed")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for request in self.scheduler.close():
            if not request.future.done():
                request.future.set_exception(EngineClosedError("the engine was closed before this request finished"))
        self._thread.join(timeout=30)
        self.runner.close()
