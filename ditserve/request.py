"""What flows through the engine: a Request in, a RequestOutput out (plain records: models read them too)."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.lora.request import AppliedLoRA


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:16]}"


@dataclass
class Request:
    """One prompt with its resolved sampling params (family defaults applied, seed drawn)."""

    prompt: str
    params: OmniDiffusionSamplingParams
    #: input images of edit / image-to-video models
    images: list[Image.Image] = field(default_factory=list)
    request_id: str = field(default_factory=new_request_id)
    arrival_time: float = field(default_factory=time.monotonic)
    #: when the scheduler admitted it into the running set (None while it waits)
    admitted_at: float | None = None
    #: set by ``abort()``; the scheduler drops the request before the next step
    abort_event: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    #: called with (steps_done, steps_total) after every denoising step (video jobs report progress)
    progress_callback: Any = None
    #: the request's LoRA adapter and scale (pinned in the LoRA manager until the future is done), or None
    lora: AppliedLoRA | None = None

    @property
    def seed(self) -> int:
        assert self.params.seed is not None, "the engine resolves the seed before a request runs"
        return self.params.seed

    @property
    def num_outputs(self) -> int:
        return self.params.num_outputs_per_prompt

    @property
    def aborted(self) -> bool:
        return self.abort_event.is_set()

    def abort(self) -> None:
        self.abort_event.set()


@dataclass(frozen=True)
class AudioTrack:
    """The sound track of one output video (LTX-2 makes one): float samples in [-1, 1], channels x samples."""

    samples: np.ndarray
    sample_rate: int


@dataclass
class RequestOutput:
    """The result of one request: images (PIL) or videos (uint8 arrays frames x H x W x 3), with the seed that
    was used, per-stage timings and the cache statistics of this request (None without a cache)."""

    request_id: str
    prompt: str
    seed: int
    params: OmniDiffusionSamplingParams
    images: list[Image.Image] = field(default_factory=list)
    videos: list[np.ndarray] = field(default_factory=list)
    fps: int | None = None
    #: one sound track per video, in the same order, where the model makes one (empty otherwise)
    audio: list[AudioTrack] = field(default_factory=list)
    #: encode_s, denoise_s, decode_s, total_s (seconds), queue_s, and batch_size
    timings: dict[str, float] = field(default_factory=dict)
    cache_stats: dict[str, Any] | None = None
    finished: bool = True
