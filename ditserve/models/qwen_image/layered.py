"""Qwen-Image-Layered (QwenImageLayeredPipeline): decomposes one input image into ``layers`` RGBA layers.

The Qwen-Image transformer (with a layer-aware RoPE and an extra timestep condition) denoises ``layers + 1``
images at once, the first being the composite, with the input image's VAE latents appended as context tokens,
as the edit models append theirs; the composite is dropped at decoding and each layer is decoded alone. What
differs from Qwen-Image, as in diffusers:

* the input image is read as RGBA (an RGB image gets an opaque alpha) and resized to about ``resolution``
  squared pixels (640 or 1024) at its aspect ratio; the layers have that size, so height and width are not
  request params;
* the prompt is encoded alone (not with the image, unlike the edit models); an empty prompt (``""`` or ``" "``)
  is replaced by a caption Qwen2.5-VL writes for the image (diffusers' default, Chinese captioning prompt);
* the schedule runs from sigma 1 down to 1/steps in equal steps of 1/steps, shifted by the square root of the
  condition image's token count over 256;
* true CFG is the plain combination (diffusers' ``cfg_normalize=False`` default), without Qwen-Image's norm
  rescale.

A request's outputs are its layers, in the pipeline's order, for each of its ``num_outputs_per_prompt`` outputs
in turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage import retrieve_timesteps
from PIL import Image

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.errors import check_choice
from ditserve.models.base import (
    ImageMode,
    ModelKind,
    RequestMedia,
    RequestState,
    StepBatch,
    request_generator,
)
from ditserve.models.qwen_image.adapter import QwenImageAdapter
from ditserve.models.qwen_image.edit import calculated_size
from ditserve.models.qwen_image.processor import processor_components
from ditserve.request import Request

#: the resolution buckets the pipeline accepts
RESOLUTIONS = (640, 1024)
#: prompts the pipeline replaces by a caption of the input image
CAPTIONED_PROMPTS = ("", " ")
#: the condition token count at which the schedule's shift ``mu`` is 1 (diffusers' 256 * 256 / 16 / 16)
SHIFT_BASE_TOKENS = 256


class QwenImageLayeredAdapter(QwenImageAdapter):
    pipeline_class_names = ("QwenImageLayeredPipeline",)
    kind = ModelKind.EDIT
    max_input_images = 1
    own_params = ("layers", "resolution")
    takes_output_size = False
    output_size_note = "about resolution x resolution pixels at its aspect ratio; set resolution (640 or 1024)"
    input_image_mode = ImageMode.RGBA
    output_image_mode = ImageMode.RGBA

    @classmethod
    def preloaded_components(cls, path: str) -> dict[str, Any]:
        """The processor (it captions images for empty prompts), where transformers cannot load it."""
        return processor_components(path)

    # ------------------------------------------------------------------ params
    def family_defaults(self) -> dict[str, Any]:
        return {**self._sampling_defaults(), "layers": 4, "resolution": 640}

    def validate_params(self, params: OmniDiffusionSamplingParams) -> None:
        super().validate_params(params)
        if params.resolution is not None:
            check_choice("resolution", params.resolution, RESOLUTIONS)

    def complete_params(self, request: Request) -> OmniDiffusionSamplingParams:
        height, width = self.output_size(request)
        return request.params.replace(height=height, width=width)

    def step_key(self, request: Request) -> tuple[Any, ...]:
        # the layers are images of the sequence: another count is another shape
        return (*super().step_key(request), request.params.layers)

    def input_image_sizes(self, request: Request) -> tuple[tuple[int, int], ...]:
        # the input is resized to its resolution bucket: inputs of one aspect ratio batch together
        height, width = self.condition_size(request)
        return ((width, height),)

    def prompt_cache_key(self, request: Request) -> tuple[Any, ...] | None:
        # a captioned prompt depends on the image
        return None if self.captions(request) else super().prompt_cache_key(request)

    # ------------------------------------------------------------------ sizes and the input image
    def condition_size(self, request: Request) -> tuple[int, int]:
        """(height, width) the input image is resized to: about resolution squared pixels, multiples of 32."""
        return calculated_size(request.images[0], request.params.resolution ** 2)

    def output_size(self, request: Request) -> tuple[int, int]:
        multiple = self.pipeline.vae_scale_factor * 2
        height, width = self.condition_size(request)
        return height // multiple * multiple, width // multiple * multiple

    def condition_image(self, request: Request) -> tuple[Image.Image, torch.Tensor]:
        """The resized input image (what Qwen2.5-VL captions) and its VAE input (1 x 4 x 1 x H x W in [-1, 1])."""
        image_processor = self.pipeline.image_processor
        height, width = self.condition_size(request)
        resized = image_processor.resize(request.images[0], height, width)
        return resized, image_processor.preprocess(resized, height, width).unsqueeze(2)

    def image_shapes(self, request: Request) -> list[tuple[int, int, int]]:
        # the composite and each layer, then the condition image
        layer = self.latent_grid(*self.output_size(request))
        return [layer] * (request.params.layers + 1) + [self.latent_grid(*self.condition_size(request))]

    # ------------------------------------------------------------------ encode
    @staticmethod
    def captions(request: Request) -> bool:
        return request.prompt in CAPTIONED_PROMPTS

    def encode_request(self, request: Request) -> dict[str, torch.Tensor]:
        prompt = request.prompt
        if self.captions(request):
            prompt = self.pipeline.get_image_caption(self.condition_image(request)[0], use_en_prompt=False,
                                                     device=self.device)
        encoded = {"prompt_embeds": self._encode_text(prompt, request)}
        if self.uses_guidance(request):
            encoded["neg_prompt_embeds"] = self._encode_text(request.params.negative_prompt, request)
        return encoded

    # ------------------------------------------------------------------ prepare
    def request_latents(self, request: Request, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        height, width = self.output_size(request)
        channels = self.pipeline.transformer.config.in_channels // 4
        # the VAE encodes in argmax mode (draws nothing), so the generator then yields diffusers' noise
        return self.pipeline.prepare_latents(self.condition_image(request)[1], request.num_outputs, channels, height,
                                             width, request.params.layers, dtype, self.device,
                                             request_generator(request))

    def _timesteps(self, scheduler: Any, num_steps: int, noise: torch.Tensor,
                   image_latents: torch.Tensor | None) -> torch.Tensor:
        sigmas = np.linspace(1.0, 0, num_steps + 1)[:-1]
        mu = (image_latents.shape[1] / SHIFT_BASE_TOKENS) ** 0.5
        timesteps, _ = retrieve_timesteps(scheduler, num_steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    # ------------------------------------------------------------------ denoise
    def _extra_inputs(self, states: Sequence[RequestState]) -> dict[str, Any]:
        # the transformer's extra timestep condition: 0 for every row, as diffusers passes it
        rows = sum(s.num_rows for s in states)
        return {"additional_t_cond": torch.zeros(rows, dtype=torch.long, device=self.device)}

    def predict(self, batch: StepBatch) -> torch.Tensor:
        return self.guided_prediction(batch, partial(self._call_branch, batch),
                                      lambda c, u, s: u + s.params.true_cfg_scale * (c - u))

    # ------------------------------------------------------------------ decode
    def decode(self, state: RequestState) -> RequestMedia:
        pipe = self.pipeline
        height, width = self.output_size(state.request)
        latents = pipe._unpack_latents(state.latents, height, width, state.params.layers, pipe.vae_scale_factor)
        # frame 0 is the composite of the layers: dropped, as diffusers does
        layers = self._denormalize(latents.to(pipe.vae.dtype))[:, :, 1:]
        outputs, channels, count, rows, columns = layers.shape
        frames = layers.permute(0, 2, 1, 3, 4).reshape(outputs * count, channels, 1, rows, columns)
        decoded = pipe.vae.decode(frames, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(decoded, output_type="pil")
