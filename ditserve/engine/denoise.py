"""The denoising loop shared by every family: encode, prepare, step the scheduler, decode.

One loop means one place for progress, cancellation between steps, and the forward context that caches read.
Families only say how to encode, prepare, predict and decode (``ditserve.models.base.LoopAdapter``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ditserve.engine.context import ForwardContext, forward_context
from ditserve.engine.request import Request
from ditserve.models.base import BatchResult, LoopAdapter, StageTimings, StepHooks


def _synchronize(device: torch.device) -> None:
    # Stage timings must measure finished work, not queued kernels.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run_denoising_loop(adapter: LoopAdapter, requests: Sequence[Request], hooks: StepHooks,
                       encode: Callable[[Request], Any]) -> BatchResult:
    before_step, after_step = hooks
    device = adapter.device
    timings = StageTimings()

    start = time.perf_counter()
    conditioning = adapter.collate([encode(r) for r in requests], requests)
    state = adapter.prepare(requests, conditioning)
    _synchronize(device)
    timings.encode_s = time.perf_counter() - start

    start = time.perf_counter()
    num_steps = len(state.timesteps)
    row_ids = state.row_request_ids()
    for step_index, t in enumerate(state.timesteps):
        before_step(step_index, num_steps)
        with forward_context(ForwardContext(step_index, num_steps, row_request_ids=row_ids)):
            model_output = adapter.predict(state, step_index, t)
        state.latents = adapter.scheduler_step(state, model_output, t)
        after_step(step_index, num_steps)
    _synchronize(device)
    timings.denoise_s = time.perf_counter() - start

    start = time.perf_counter()
    media = adapter.decode(state)
    _synchronize(device)
    timings.decode_s = time.perf_counter() - start
    return BatchResult(media=media, timings=timings)
