"""The systems the bench drives: ditserve's ``Omni`` and diffusers' own pipeline ``__call__``.

Both make one image or video per (prompt, seed) with the same resolved sampling params, and report the wall time,
the denoising time and the block work counted while it ran.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ditserve.bench.counting import BlockWorkCounter
from ditserve.config import OmniDiffusionSamplingParams

#: sampling params that diffusers' pipelines take under the same name
DIFFUSERS_CALL_FIELDS = ("num_inference_steps", "height", "width", "guidance_scale", "true_cfg_scale",
                         "negative_prompt", "max_sequence_length", "num_frames", "guidance_scale_2",
                         "boundary_ratio")


@dataclass(frozen=True)
class BenchItem:
    """One prompt of a bench run, with the input picture an edit model edits (None for other models)."""

    prompt: str
    image: Image.Image | None = None

    def omni_input(self) -> str | dict[str, Any]:
        """The prompt as ``Omni.generate`` takes it."""
        if self.image is None:
            return self.prompt
        return {"prompt": self.prompt, "multi_modal_data": {"image": self.image}}

    @classmethod
    def from_omni_input(cls, item: str | Mapping[str, Any]) -> BenchItem:
        if isinstance(item, str):
            return cls(item)
        return cls(item["prompt"], item["multi_modal_data"]["image"])


@dataclass
class SampleResult:
    #: the image, or the video's uint8 frames (frames x height x width x 3)
    media: Image.Image | np.ndarray
    wall_s: float
    denoise_s: float | None
    #: attention + MLP bodies run in the transformer blocks while making this sample
    work_units: int
    cache_stats: dict[str, Any] | None = None


def synchronize(device: torch.device) -> None:
    # a timer must stop on finished work, not on queued kernels
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class DitserveSystem:
    """One ``Omni`` engine (one cache setting); the prompt-embedding cache is off so every image pays its
    text encoding, as it does in diffusers' pipeline."""

    def __init__(self, engine_options: Mapping[str, Any], backend: str | None = None,
                 cache_config: Mapping[str, Any] | None = None) -> None:
        from ditserve.entrypoints.omni import Omni

        self.omni = Omni(**engine_options, cache_backend=backend, cache_config=dict(cache_config or {}) or None,
                         enable_prompt_embed_cache=False)
        self.counter = BlockWorkCounter(self.omni.engine.adapter.transformers())

    @property
    def device(self) -> torch.device:
        return self.omni.engine.adapter.device

    def resolve(self, params: OmniDiffusionSamplingParams) -> OmniDiffusionSamplingParams:
        return self.omni.engine.adapter.resolve_params(params)

    def generate(self, item: BenchItem, params: OmniDiffusionSamplingParams) -> SampleResult:
        self.counter.take()
        start = time.perf_counter()
        output = self.omni.generate(item.omni_input(), params)[0]
        synchronize(self.device)
        wall = time.perf_counter() - start
        media = output.videos[0] if output.videos else output.images[0]
        return SampleResult(media, wall, output.timings.get("denoise_s"), self.counter.take(), output.cache_stats)

    def close(self) -> None:
        self.counter.remove()
        self.omni.close()


class DiffusersSystem:
    """diffusers' own pipeline on the same model folder; peers are applied to it one at a time.
    ``model_arguments``: the keyword arguments the pipeline needs beyond the sampling params to make what our
    adapter makes (``ModelAdapter.diffusers_call_arguments``); ``video``: the pipeline makes videos, whose float
    frames are rounded to uint8 as ditserve's video adapters round theirs."""

    def __init__(self, model_path: str, device: torch.device, dtype: torch.dtype,
                 model_arguments: Mapping[str, Any] | None = None, video: bool = False) -> None:
        from diffusers import DiffusionPipeline

        self.model_arguments = dict(model_arguments or {})
        self.video = video
        self.pipeline = DiffusionPipeline.from_pretrained(model_path, dtype=dtype)
        self.pipeline.to(device)
        self.pipeline.set_progress_bar_config(disable=True)
        self.device = device
        self.counter = BlockWorkCounter(self._transformers())
        self._call_parameters = set(inspect.signature(self.pipeline.__call__).parameters)
        self._first_forward_at: float | None = None
        self._last_step_at: float | None = None
        self._timer_handle = self.pipeline.transformer.register_forward_pre_hook(self._mark_forward)

    def _transformers(self) -> list[torch.nn.Module]:
        names = ("transformer", "transformer_2")
        return [getattr(self.pipeline, n) for n in names if getattr(self.pipeline, n, None) is not None]

    def _mark_forward(self, module: torch.nn.Module, args: object) -> None:
        if self._first_forward_at is None:
            self._first_forward_at = time.perf_counter()

    def _mark_step_end(self, pipeline: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        synchronize(self.device)
        self._last_step_at = time.perf_counter()
        return callback_kwargs

    def call_arguments(self, params: OmniDiffusionSamplingParams) -> tuple[dict[str, Any], list[str]]:
        """``__call__`` keyword arguments for ``params`` (seed aside), and the set fields the pipeline lacks."""
        values = {name: getattr(params, name) for name in DIFFUSERS_CALL_FIELDS if getattr(params, name) is not None}
        accepted = {k: v for k, v in values.items() if k in self._call_parameters}
        return accepted, sorted(set(values) - set(accepted))

    def generate(self, item: BenchItem, params: OmniDiffusionSamplingParams) -> SampleResult:
        from ditserve.models.common import to_uint8_video

        arguments, _ = self.call_arguments(params)
        arguments |= self.model_arguments
        if item.image is not None:
            arguments["image"] = item.image
        if "callback_on_step_end" in self._call_parameters:
            arguments["callback_on_step_end"] = self._mark_step_end
        generator = torch.Generator("cpu").manual_seed(params.seed)
        self.counter.take()
        self._first_forward_at = self._last_step_at = None
        start = time.perf_counter()
        with torch.inference_mode():
            output = self.pipeline(prompt=item.prompt, generator=generator, output_type="np" if self.video else "pil",
                                   **arguments)
        synchronize(self.device)
        wall = time.perf_counter() - start
        denoise = None
        if self._first_forward_at is not None and self._last_step_at is not None:
            denoise = self._last_step_at - self._first_forward_at
        media = to_uint8_video(np.asarray(output.frames[0])) if self.video else output.images[0]
        return SampleResult(media, wall, denoise, self.counter.take())

    def close(self) -> None:
        self._timer_handle.remove()
        self.counter.remove()
        self.pipeline = None
