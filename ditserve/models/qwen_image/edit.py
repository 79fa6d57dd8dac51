"""Qwen-Image-Edit (QwenImageEditPipeline, one input image) and Qwen-Image-Edit-2509 (QwenImageEditPlusPipeline,
one or more input images).

Both encode the prompt together with the input image(s) through Qwen2.5-VL (so the embedding depends on the
images and is never cached), and append the images' VAE latents to the noisy latents as extra image tokens
that the transformer attends to; only the noisy tokens are predicted. As in diffusers, the output size
defaults to about one megapixel at the aspect ratio of the (last) input image, and the VAE sees every input
image at about one megapixel whatever the output size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ditserve.models.base import ModelKind, request_generator
from ditserve.models.qwen_image.adapter import QwenImageAdapter
from ditserve.models.qwen_image.processor import processor_components
from ditserve.request import Request

#: pixel areas diffusers resizes input images to (its module constants, not configurable)
VAE_IMAGE_AREA = 1024 * 1024
PLUS_CONDITION_IMAGE_AREA = 384 * 384


def calculated_size(image: Image.Image, area: int) -> tuple[int, int]:
    """(height, width) of about ``area`` pixels at the image's aspect ratio, multiples of 32 (diffusers)."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    width, height, *_ = calculate_dimensions(area, image.size[0] / image.size[1])
    return height, width


@dataclass
class EditInputs:
    """A request's input images, resized as diffusers resizes them, in the form its pipeline methods take:
    a PIL image and a tensor (Qwen-Image-Edit), or lists of them (Qwen-Image-Edit-2509)."""

    #: the ``image`` argument of ``encode_prompt``: what Qwen2.5-VL sees with the prompt
    prompt_images: Any
    #: the ``image(s)`` argument of ``prepare_latents``: what the VAE encodes (1 x 3 x 1 x H x W in [-1, 1])
    vae_images: Any


class QwenImageEditAdapter(QwenImageAdapter):
    pipeline_class_names = ("QwenImageEditPipeline",)
    kind = ModelKind.EDIT
    max_input_images = 1
    more_images_note = " (Qwen-Image-Edit-2509, QwenImageEditPlusPipeline, takes several)"

    @classmethod
    def preloaded_components(cls, path: str) -> dict[str, Any]:
        """Components the loader should pass to ``from_pretrained`` instead of letting it load them: the
        processor, where transformers cannot load it (no torchvision)."""
        return processor_components(path)

    # ------------------------------------------------------------------ params
    def family_defaults(self) -> dict[str, Any]:
        # height and width stay None: they follow the input image (see ``output_size``)
        return self._sampling_defaults()

    def prompt_cache_key(self, request: Request) -> None:
        # Qwen2.5-VL reads the input images with the prompt: the embedding is not a function of the text alone
        return None

    # ------------------------------------------------------------------ sizes and images
    def size_reference_image(self, request: Request) -> Image.Image:
        """The input image whose aspect ratio sets the default output size."""
        return request.images[0]

    def output_size(self, request: Request) -> tuple[int, int]:
        height, width = calculated_size(self.size_reference_image(request), VAE_IMAGE_AREA)
        height = request.params.height or height
        width = request.params.width or width
        multiple = self.pipeline.vae_scale_factor * 2
        return height // multiple * multiple, width // multiple * multiple

    def complete_params(self, request: Request) -> Any:
        height, width = self.output_size(request)
        return request.params.replace(height=height, width=width)

    def vae_sizes(self, request: Request) -> list[tuple[int, int]]:
        """(height, width) at which the VAE sees each input image."""
        return [calculated_size(image, VAE_IMAGE_AREA) for image in request.images[:1]]

    def image_shapes(self, request: Request) -> list[tuple[int, int, int]]:
        return super().image_shapes(request) + [self.latent_grid(h, w) for h, w in self.vae_sizes(request)]

    def edit_inputs(self, request: Request) -> EditInputs:
        image_processor = self.pipeline.image_processor
        (height, width), = self.vae_sizes(request)
        resized = image_processor.resize(request.images[0], height, width)
        # diffusers preprocesses the already-resized image for the VAE and shows the same one to Qwen2.5-VL
        vae_image = image_processor.preprocess(resized, height, width).unsqueeze(2)
        return EditInputs(prompt_images=resized, vae_images=vae_image)

    # ------------------------------------------------------------------ encode
    def encode_request(self, request: Request) -> dict[str, torch.Tensor]:
        prompt_images = self.edit_inputs(request).prompt_images
        encoded = {"prompt_embeds": self._encode_text_with_images(request.prompt, prompt_images, request)}
        if self.uses_guidance(request):
            encoded["neg_prompt_embeds"] = self._encode_text_with_images(
                request.params.negative_prompt, prompt_images, request)
        return encoded

    def _encode_text_with_images(self, text: str, images: Any, request: Request) -> torch.Tensor:
        embeds, _ = self.pipeline.encode_prompt(
            prompt=[text], image=images, device=self.device, num_images_per_prompt=1,
            max_sequence_length=request.params.max_sequence_length)
        return embeds

    # ------------------------------------------------------------------ prepare
    def request_latents(self, request: Request, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        height, width = self.output_size(request)
        channels = self.pipeline.transformer.config.in_channels // 4
        # the VAE encodes in argmax mode (draws nothing), so the generator then yields diffusers' noise
        return self.pipeline.prepare_latents(self.edit_inputs(request).vae_images, request.num_outputs, channels,
                                             height, width, dtype, self.device, request_generator(request))


class QwenImageEditPlusAdapter(QwenImageEditAdapter):
    """Qwen-Image-Edit-2509: several input images, each seen by Qwen2.5-VL at about 384x384 pixels and by the
    VAE at about one megapixel; the last image sets the default output size."""

    pipeline_class_names = ("QwenImageEditPlusPipeline",)
    max_input_images = None

    def size_reference_image(self, request: Request) -> Image.Image:
        return request.images[-1]

    def vae_sizes(self, request: Request) -> list[tuple[int, int]]:
        return [calculated_size(image, VAE_IMAGE_AREA) for image in request.images]

    def edit_inputs(self, request: Request) -> EditInputs:
        image_processor = self.pipeline.image_processor
        prompt_images = []
        for image in request.images:
            height, width = calculated_size(image, PLUS_CONDITION_IMAGE_AREA)
            prompt_images.append(image_processor.resize(image, height, width))
        # unlike Qwen-Image-Edit, the VAE images are preprocessed from the originals
        vae_images = [image_processor.preprocess(image, height, width).unsqueeze(2)
                      for image, (height, width) in zip(request.images, self.vae_sizes(request), strict=True)]
        return EditInputs(prompt_images=prompt_images, vae_images=vae_images)
