"""LongCat-Image-Edit (LongCatImageEditPipeline): one input image, edited as the prompt says.

The prompt is encoded together with the input image (at half the output's size) through Qwen2.5-VL, so the
embedding depends on the image and is never cached; the image's VAE latents, at the output's size, follow the
noisy latents as extra image tokens that the transformer attends to, and only the noisy tokens are predicted.
Plain classifier-free guidance: the edit pipeline has no prompt rewriting and no CFG renorm.

Size: diffusers' edit pipeline takes no height or width; it makes about one megapixel at the input image's aspect
ratio (sides rounded up to multiples of 16, then down to the VAE's multiple), and so do we by default. A request
may ask for another size (the server does so to stay within ``--max-image-size``): the input image is then
resized to it, as diffusers resizes it to its own choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import calculate_dimensions
from PIL import Image

from ditserve.models.base import ModelKind, RequestState, request_generator
from ditserve.models.longcat_image.adapter import LongCatAdapterBase
from ditserve.request import Request

#: the pixel area diffusers resizes the input image to (a constant of its ``__call__``)
EDIT_IMAGE_AREA = 1024 * 1024


@dataclass
class EditInputs:
    """A request's input image, resized as diffusers resizes it."""

    #: what Qwen2.5-VL sees with the prompt: the image at half the resized size
    prompt_image: Image.Image
    #: what the VAE encodes: 1 x 3 x H x W in [-1, 1]
    vae_image: torch.Tensor
    #: (height, width) the image was resized to, which ``prepare_latents`` takes (it floors to the multiple)
    size: tuple[int, int]


class LongCatImageEditAdapter(LongCatAdapterBase):
    pipeline_class_names = ("LongCatImageEditPipeline",)
    kind = ModelKind.EDIT
    max_input_images = 1

    def family_defaults(self) -> dict[str, Any]:
        # height and width stay None: they follow the input image (see ``output_size``)
        return self._sampling_defaults()

    def prompt_cache_key(self, request: Request) -> None:
        # Qwen2.5-VL reads the input image with the prompt: the embedding is not a function of the text alone
        return None

    # ------------------------------------------------------------------ sizes and images
    def _floored(self, height: int, width: int) -> tuple[int, int]:
        multiple = self.size_multiple
        return height // multiple * multiple, width // multiple * multiple

    def model_size(self, request: Request) -> tuple[int, int]:
        """(height, width) diffusers resizes the input image to: about one megapixel at its aspect ratio."""
        image_width, image_height = request.images[0].size
        width, height = calculate_dimensions(EDIT_IMAGE_AREA, image_width / image_height)
        return height, width

    def output_size(self, request: Request) -> tuple[int, int]:
        height, width = self._floored(*self.model_size(request))
        return request.params.height or height, request.params.width or width

    def complete_params(self, request: Request) -> Any:
        height, width = self.output_size(request)
        return request.params.replace(height=height, width=width)

    def edit_inputs(self, request: Request) -> EditInputs:
        model_size = self.model_size(request)
        # the model's own size is resized to unrounded first, as diffusers does (the VAE input is then rounded
        # down); a size of the request's own is a multiple already
        size = model_size if self._floored(*model_size) == self.output_size(request) else self.output_size(request)
        image_processor = self.pipeline.image_processor
        resized = image_processor.resize(request.images[0], *size)
        return EditInputs(prompt_image=image_processor.resize(resized, size[0] // 2, size[1] // 2),
                          vae_image=image_processor.preprocess(resized, *size), size=size)

    # ------------------------------------------------------------------ encode
    def _encode_text_with_image(self, text: str, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, text_ids = self.pipeline.encode_prompt(prompt=[text], image=image, num_images_per_prompt=1)
        return embeds, text_ids

    def encode_request(self, request: Request) -> dict[str, torch.Tensor]:
        image = self.edit_inputs(request).prompt_image
        embeds, text_ids = self._encode_text_with_image(request.prompt, image)
        encoded = {"prompt_embeds": embeds, "text_ids": text_ids}
        if self.uses_guidance(request):
            neg_embeds, neg_text_ids = self._encode_text_with_image(self.unconditional_prompt(request), image)
            encoded |= {"neg_prompt_embeds": neg_embeds, "neg_text_ids": neg_text_ids}
        return encoded

    # ------------------------------------------------------------------ prepare
    def prepare(self, request: Request, embeddings: dict[str, torch.Tensor]) -> RequestState:
        inputs = self.edit_inputs(request)
        prompt_embeds = embeddings["prompt_embeds"]
        # the VAE encodes in argmax mode (draws nothing), so the generator then yields diffusers' noise; image
        # positions start after the text, whose length the prompt image sets
        latents, image_latents, latent_ids, image_ids = self.pipeline.prepare_latents(
            inputs.vae_image, request.num_outputs, self.latent_channels, *inputs.size, prompt_embeds.dtype,
            prompt_embeds.shape[1], self.device, request_generator(request))
        conditioning = {**embeddings, "image_latents": image_latents,
                        "image_ids": torch.cat([latent_ids, image_ids], dim=0)}
        return self._state(request, latents, conditioning)
