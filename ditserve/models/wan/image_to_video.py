"""Wan2.2 image-to-video (WanImageToVideoPipeline: I2V-A14B, TI2V-5B): the text-to-video loop, given a first frame.

The request's one input image is resized to the output size and VAE-encoded (the distribution's mode, no noise)
once, in ``prepare``. I2V-A14B: as the first frame of an otherwise empty video; with a 4-channel frame mask (1 on
the given frame) those latents are the condition that each step concatenates, on channels, to the request's noisy
latents. TI2V-5B (``expand_timesteps``): the image alone; each step the first latent frame of the transformer's
input is those latents, with timestep 0 on its tokens, and so is the decoded video's.
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
        # the condition has one row per output, as the latents: the encoding itself ran once
        prepared = pipe.prepare_latents(
            image.to(self.device, torch.float32), request.num_outputs, pipe.vae.config.z_dim, p.height, p.width,
            p.num_frames, torch.float32, self.device, request_generator(request))
        if self.expands_timesteps:
            latents, condition, first_frame_mask = prepared
            return latents, {"condition": condition, "first_frame_mask": first_frame_mask}
        latents, condition = prepared
        return latents, {"condition": condition}

    @property
    def expands_timesteps(self) -> bool:
        """TI2V-5B: the first latent frame is the image's own latents, at timestep 0, instead of a condition
        concatenated on channels."""
        return bool(self.pipeline.config.expand_timesteps)

    @staticmethod
    def _with_first_frame(state: RequestState, latents: torch.Tensor) -> torch.Tensor:
        """TI2V: ``latents`` with their first frame replaced by the input image's latents (the mask is 0 there)."""
        mask = state.conditioning["first_frame_mask"]
        return (1 - mask) * state.conditioning["condition"] + mask * latents

    def model_input(self, batch: StepBatch, states: Sequence[RequestState]) -> torch.Tensor:
        if self.expands_timesteps:
            return torch.cat([self._with_first_frame(s, s.latents) for s in states])
        condition = batch.remember("condition", states,
                                   lambda: torch.cat([s.conditioning["condition"] for s in states]))
        return torch.cat([batch.latents(states), condition], dim=1)

    def timestep_input(self, batch: StepBatch, states: Sequence[RequestState], latents: torch.Tensor,
                       patch_size: Sequence[int]) -> torch.Tensor:
        if not self.expands_timesteps:
            return super().timestep_input(batch, states, latents, patch_size)
        # one timestep per latent token, 0 on the first frame's tokens: the mask read at each patch's corner
        per_request = []
        for state in states:
            mask = state.conditioning["first_frame_mask"][0, 0][:, ::patch_size[1], ::patch_size[2]]
            per_request.append((mask * state.t).flatten().expand(state.num_rows, -1))
        return torch.cat(per_request)

    def final_latents(self, state: RequestState) -> torch.Tensor:
        if self.expands_timesteps:
            return self._with_first_frame(state, state.latents)
        return state.latents
