"""LTX-2 image-to-video (LTX2ImageToVideoPipeline): the text-to-video loop, with the first latent frame given.

The request's one input image is re-compressed as H.264 at the checkpoint's CRF (the compression the model was
trained against, diffusers' default), resized to the output size and VAE-encoded (the distribution's mode) once,
in ``prepare``; the first latent frame of every output starts as those latents, the others as noise. Each step
that frame's tokens get timestep 0 and keep their latents through the scheduler step. The audio is generated as in
text-to-video.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.pipelines.ltx2.utils import apply_image_conditioning_crf, resolve_default_image_crf

from ditserve.models.base import InputImages, RequestState, StepBatch
from ditserve.models.ltx2.adapter import LTX2Adapter
from ditserve.request import Request


class LTX2ImageToVideoAdapter(LTX2Adapter):
    pipeline_class_names = ("LTX2ImageToVideoPipeline",)
    #: the first frame of the video
    max_input_images = 1

    @property
    def input_images(self) -> InputImages:
        return InputImages.REQUIRED

    def initial_video_latents(self, request: Request, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
        pipe, p = self.pipeline, request.params
        image = request.images[0].convert("RGB")
        crf = resolve_default_image_crf(pipe.text_encoder)
        if crf:
            image = PIL.Image.fromarray(apply_image_conditioning_crf(np.array(image), crf))
        pixels = pipe.video_processor.preprocess(image, height=p.height, width=p.width)
        latents, first_frame = pipe.prepare_latents(
            pixels.to(self.device, pipe.text_encoder.dtype), request.num_outputs,
            pipe.transformer.config.in_channels, p.height, p.width, p.num_frames, 0.0, torch.float32, self.device,
            generator)
        # 1 on the tokens of the given first latent frame, one row per output
        return latents, {"first_frame": first_frame}

    def video_timestep(self, batch: StepBatch, states: Sequence[RequestState]) -> torch.Tensor:
        # one timestep per video token: 0 on the given frame's
        first_frame = batch.remember("first_frame", states,
                                     lambda: torch.cat([s.conditioning["first_frame"] for s in states]))
        return batch.timesteps(states).unsqueeze(-1) * (1 - first_frame)

    def step_video(self, state: RequestState, before: torch.Tensor, stepped: torch.Tensor) -> torch.Tensor:
        # the given frame keeps its latents (diffusers steps the other frames only)
        return torch.where(state.conditioning["first_frame"].bool().unsqueeze(-1), before, stepped)
