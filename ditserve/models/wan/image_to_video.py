"""Wan2.2 image-to-video (WanImageToVideoPipeline, I2V-A14B): the text-to-video loop, conditioned on a first frame.

The request's one input image is resized to the output size and VAE-encoded (the distribution's mode, no noise)
once, in ``prepare``, as the first frame of an otherwise empty video; with a 4-channel frame mask (1 on the given
frame) those latents are the condition that each step concatenates, on channels, to the request's noisy latents.
Guidance, the two experts and ``boundary_ratio`` / ``guidance_scale_2`` are the text-to-video adapter's.
Wan2.1 I2V (a CLIP image encoder feeding ``encoder_hidden_states_image``) is refused at load.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ditserve.errors import UnsupportedModelError
from ditserve.models.base import InputImages, RequestState, StepBatch, request_generator
from ditserve.models.wan.adapter import WanAdapter
from ditserve.request import Request


class WanImageToVideoAdapter(WanAdapter):
    pipeline_class_names = ("WanImageToVideoPipeline",)
    #: the first frame of the video
    max_input_images = 1

    def __init__(self, pipeline: Any, model_defaults: Any = None) -> None:
        super().__init__(pipeline, model_defaults)
        if self._any_transformer().config.image_dim is not None:
            raise UnsupportedModelError(
                f"{self.pipeline_class_name} with an image encoder (Wan2.1 I2V: CLIP image embeddings reach the "
                "transformer) is not served yet; Wan2.2 I2V-A14B, whose condition is the first frame's latents "
                "alone, is", param="model")

    @property
    def input_images(self) -> InputImages:
        return InputImages.REQUIRED

    def initial_latents(self, request: Request) -> tuple[torch.Tensor, dict[str, Any]]:
        pipe, p = self.pipeline, request.params
        image = pipe.video_processor.preprocess(request.images[0], height=p.height, width=p.width)
        latents, condition = pipe.prepare_latents(
            image.to(self.device, torch.float32), request.num_outputs, pipe.vae.config.z_dim, p.height, p.width,
            p.num_frames, torch.float32, self.device, request_generator(request))
        # one row per output, as the latents: the encoding itself ran once
        return latents, {"condition": condition}

    def model_input(self, batch: StepBatch, states: Sequence[RequestState]) -> torch.Tensor:
        condition = batch.remember("condition", states,
                                   lambda: torch.cat([s.conditioning["condition"] for s in states]))
        return torch.cat([batch.latents(states), condition], dim=1)
