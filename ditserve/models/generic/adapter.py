"""Any other diffusers pipeline: run its own ``__call__``.

What this path can do: every sampling param the pipeline's ``__call__`` accepts, per-request seeds, progress,
abort between steps (from ``callback_on_step_end``), stage timings, and caches that hook the transformer.
What it cannot do is an error, never silently skipped: a param the pipeline does not take, and batching
(each request runs alone, so that its output equals diffusers' own exactly). Only arguments the ``__call__``
declares are passed.

A pipeline whose ``__call__`` takes no ``prompt`` or no ``generator`` (per-request seeds) cannot be served:
refused when it is loaded, at ``Omni(...)``. One that takes no ``callback_on_step_end`` (as LongCat-Image's) runs, but
ditserve never sees its steps (``reports_steps`` is False, and a warning says so when it is loaded): progress is
reported once, when the request finishes; an abort stops a request that has not started, while a running one
answers its caller at once and runs to its end with its output dropped; residual caches, which need the step
index, are refused at start-up.

Outputs: images, or for video pipelines frames. A pipeline that returns several images per output (a list of
layers for each image, as Qwen-Image-Layered's does) is flattened image-major: every layer of the first image in
the pipeline's order, then every layer of the next.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import numpy as np
import torch

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.errors import InvalidParameterError, UnsupportedModelError
from ditserve.forward_context import ForwardContext, RowOwner, forward_context, move_current
from ditserve.models.base import (
    FAMILY_ONLY_PARAMS,
    ModelAdapter,
    ModelKind,
    RequestMedia,
    StageTimings,
    request_generator,
)
from ditserve.models.common import to_uint8_video
from ditserve.request import Request

logger = logging.getLogger(__name__)

#: what a pipeline's ``__call__`` must take to be served: the prompt, and a generator for the request's own seed
REQUIRED_CALL_PARAMS = ("prompt", "generator")
#: the ``__call__`` argument through which ditserve sees each denoising step
STEP_CALLBACK = "callback_on_step_end"
# our param name -> diffusers' name where they differ
_RENAMED = {"num_outputs_per_prompt": "num_images_per_prompt"}
#: ours alone: the seed becomes the generator, fps only matters when we encode a video
_NOT_FORWARDED = {"seed", "fps"}

#: what the runner gives a whole run: called before each step with (step_index, num_steps), which may raise to
#: abort, and after each step with the same
StepHooks = tuple[Callable[[int, int], None], Callable[[int, int], None]]


class GenericAdapter(ModelAdapter):
    """Runs diffusers' own ``__call__`` for one request at a time (request scheduling only)."""

    def __init__(self, pipeline: Any, model_defaults: dict[str, Any] | None = None) -> None:
        super().__init__(pipeline, model_defaults)
        self._call_params = inspect.signature(type(pipeline).__call__).parameters
        missing = [name for name in REQUIRED_CALL_PARAMS if name not in self._call_params]
        if missing:
            raise UnsupportedModelError(
                f"{self.pipeline_class_name}.__call__ takes no {', '.join(missing)}: the generic path needs "
                f"{' and '.join(REQUIRED_CALL_PARAMS)} (each request's own seed)", param="model")
        self.kind = self._infer_kind()
        # a pipeline of another family may take them too: its own __call__ says
        self.own_params = tuple(name for name in FAMILY_ONLY_PARAMS if name in self._call_params)
        self.reports_steps = STEP_CALLBACK in self._call_params
        if not self.reports_steps:
            logger.warning("%s.__call__ takes no %s: progress is reported only when a request finishes, an abort "
                           "stops only a request that has not started, and step caches are unavailable",
                           self.pipeline_class_name, STEP_CALLBACK)

    def _infer_kind(self) -> ModelKind:
        if "num_frames" in self._call_params:
            return ModelKind.VIDEO
        if "image" in self._call_params:
            return ModelKind.EDIT
        return ModelKind.IMAGE

    def transformers(self) -> list[torch.nn.Module]:
        found = [getattr(self.pipeline, n, None) for n in ("transformer", "transformer_2", "unet")]
        return [m for m in found if isinstance(m, torch.nn.Module)]

    def family_defaults(self) -> dict[str, Any]:
        ours = {f.name for f in fields(OmniDiffusionSamplingParams)}
        defaults = {}
        for name in ours - _NOT_FORWARDED:
            param = self._call_params.get(_RENAMED.get(name, name))
            if param is not None and param.default is not inspect.Parameter.empty and param.default is not None:
                defaults[name] = param.default
        return defaults

    def validate_params(self, params: Any) -> None:
        # sizes first: diffusers would silently round a size that is not a multiple of its factor
        super().validate_params(params)
        if params.fps is not None and self.kind is not ModelKind.VIDEO:
            raise InvalidParameterError(f"fps is only for video models; {self.pipeline_class_name} makes images",
                                        param="fps")
        for f in fields(params):
            value = getattr(params, f.name)
            if f.name in _NOT_FORWARDED or value is None or (f.name == "num_outputs_per_prompt" and value == 1):
                continue
            if _RENAMED.get(f.name, f.name) not in self._call_params:
                raise InvalidParameterError(
                    f"{f.name} is not a parameter of {self.pipeline_class_name}.__call__ (generic path)",
                    param=f.name)

    def batch_key(self, request: Request) -> tuple[Any, ...]:
        # diffusers draws one noise tensor for the whole batch: batching would change a request's output
        return (request.request_id,)

    def _call_kwargs(self, request: Request) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"prompt": request.prompt, "generator": request_generator(request)}
        for f in fields(request.params):
            value = getattr(request.params, f.name)
            name = _RENAMED.get(f.name, f.name)
            if f.name not in _NOT_FORWARDED and value is not None and name in self._call_params:
                kwargs[name] = value
        if request.images:
            kwargs["image"] = request.images[0] if len(request.images) == 1 else request.images
        if self.kind is ModelKind.VIDEO and "output_type" in self._call_params:
            kwargs["output_type"] = "np"
        return kwargs

    def run(self, request: Request, hooks: StepHooks) -> tuple[RequestMedia, StageTimings]:
        """One request through the pipeline's own ``__call__``."""
        before_step, after_step = hooks
        steps = request.params.num_inference_steps or 0
        marks: dict[str, float] = {}

        def on_transformer_call(_module: torch.nn.Module, _args: Any) -> None:
            marks.setdefault("denoise_start", time.perf_counter())

        def on_step_end(_pipe: Any, step_index: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            after_step(step_index, steps)
            marks["denoise_end"] = time.perf_counter()
            move_current(ForwardContext((RowOwner(request.request_id, step_index + 1, steps),)))
            if step_index + 1 < steps:
                before_step(step_index + 1, steps)
            return tensors

        call_kwargs = self._call_kwargs(request)
        if self.reports_steps:
            call_kwargs[STEP_CALLBACK] = on_step_end
        handles = [m.register_forward_pre_hook(on_transformer_call) for m in self.transformers()]
        start = time.perf_counter()
        try:
            before_step(0, steps)
            with torch.inference_mode(), forward_context(ForwardContext((RowOwner(request.request_id, 0, steps),))):
                result = self.pipeline(**call_kwargs)
        finally:
            for handle in handles:
                handle.remove()
        end = time.perf_counter()
        if not self.reports_steps:
            after_step(steps - 1, steps)  # the only progress report there is: the whole run is done
        denoise_start = marks.get("denoise_start", start)
        denoise_end = marks.get("denoise_end", end)
        timings = StageTimings(encode_s=denoise_start - start, denoise_s=denoise_end - denoise_start,
                               decode_s=end - denoise_end)
        return self._media(result), timings

    def _media(self, result: Any) -> list[Any]:
        if self.kind is ModelKind.VIDEO:
            frames = result.frames
            return [to_uint8_video(np.asarray(v)) for v in frames]
        # several images per output (layers): image-major, each output's images in the pipeline's order
        return [image for output in result.images
                for image in (output if isinstance(output, (list, tuple)) else [output])]
