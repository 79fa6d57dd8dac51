"""FLUX.1-Kontext (FluxKontextPipeline): image editing with the FLUX transformer.

The input image is VAE-encoded and packed like the noise; its tokens follow the noisy ones in the transformer's
sequence, with position ids whose first coordinate is 1 (the noisy tokens' is 0), and only the noisy tokens are
predicted. Text encoding, guidance (embedded ``guidance_scale``, true CFG with a negative prompt), the schedule
and decoding are FLUX.1's (``FluxAdapter``); the prompt embedding depends on the text alone, so it is cached.

Sizes follow diffusers' ``__call__``: the input image goes to the Kontext training resolution nearest its aspect
ratio (about one megapixel) unless ``auto_resize`` is off, then down to the size multiple; the output keeps the
aspect ratio of the requested height and width (default square) but is rescaled to ``max_area`` pixels (default
1024x1024), so a request's size sets its shape, not its pixel count. ``max_area`` and ``auto_resize``
(diffusers' ``_auto_resize``) are model-level settings read from the folder's ``ditserve_defaults.json``
``sampling_defaults``, as Z-Image's guidance options are: a small model trained at 64x64 sets them there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from PIL import Image

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.errors import InvalidParameterError, InvalidTypeError
from ditserve.models.base import ModelKind, request_generator
from ditserve.models.flux.adapter import FluxAdapter, PackedLatents
from ditserve.request import Request


@dataclass(frozen=True)
class KontextSizing:
    """How a Kontext model sizes images: the output's pixel area, and whether an input image first goes to the
    preferred Kontext resolution nearest its aspect ratio (diffusers' ``max_area`` and ``_auto_resize``, with
    their defaults)."""

    max_area: int = 1024 ** 2
    auto_resize: bool = True

    @classmethod
    def take_from(cls, model_defaults: dict[str, Any]) -> KontextSizing:
        """The sizing the model folder sets, taken out of its defaults (they are not sampling params)."""
        max_area = model_defaults.pop("max_area", cls.max_area)
        auto_resize = model_defaults.pop("auto_resize", cls.auto_resize)
        if isinstance(max_area, bool) or not isinstance(max_area, int) or max_area < 1:
            raise InvalidTypeError(f"max_area must be a positive whole number of pixels, got {max_area!r}",
                                   param="max_area")
        if not isinstance(auto_resize, bool):
            raise InvalidTypeError(f"auto_resize must be true or false, got {auto_resize!r}", param="auto_resize")
        return cls(max_area=max_area, auto_resize=auto_resize)


class FluxKontextAdapter(FluxAdapter):
    pipeline_class_names = ("FluxKontextPipeline",)
    kind = ModelKind.EDIT
    #: one image per prompt: diffusers reads a list of images as one image per prompt of a batch
    max_input_images = 1
    # FluxKontextPipeline passes its linear sigmas to every scheduler
    schedulers_may_choose_sigmas: ClassVar[bool] = False

    def __init__(self, pipeline: Any, model_defaults: Mapping[str, Any] | None = None) -> None:
        super().__init__(pipeline, model_defaults)
        self.sizing = KontextSizing.take_from(self.model_defaults)

    # ------------------------------------------------------------------ sizes
    def diffusers_call_arguments(self) -> dict[str, Any]:
        return {"max_area": self.sizing.max_area, "_auto_resize": self.sizing.auto_resize}

    def family_defaults(self) -> dict[str, Any]:
        defaults = super().family_defaults()
        # diffusers' default request is square: the default output is that shape at max_area pixels
        height, width = self.output_size(defaults["height"], defaults["width"])
        return defaults | {"height": height, "width": width}

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the output for a requested size: its aspect ratio at ``max_area`` pixels, floored
        to the size multiple (diffusers' arithmetic, rounding included)."""
        aspect_ratio = width / height
        multiple = self.size_multiple
        width = round((self.sizing.max_area * aspect_ratio) ** 0.5) // multiple * multiple
        height = round((self.sizing.max_area / aspect_ratio) ** 0.5) // multiple * multiple
        return height, width

    def complete_params(self, request: Request) -> OmniDiffusionSamplingParams:
        p = request.params
        height, width = self.output_size(p.height, p.width)
        for name, value in (("height", height), ("width", width)):
            if not value:  # an extreme aspect ratio leaves less than one size multiple on the short side
                raise InvalidParameterError(
                    f"height={p.height} x width={p.width} at this model's {self.sizing.max_area} pixels leaves a "
                    f"{name} under {self.size_multiple}: choose a less extreme aspect ratio", param=name)
        return p.replace(height=height, width=width)

    def input_size(self, image: Image.Image) -> tuple[int, int]:
        """(height, width) at which the VAE sees an input image."""
        height, width = self.pipeline.image_processor.get_default_height_width(image)
        # an image smaller than the multiple has no size to keep (validate_inputs refuses it)
        if self.sizing.auto_resize and height and width:
            aspect_ratio = width / height
            _, width, height = min((abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        multiple = self.size_multiple
        return height // multiple * multiple, width // multiple * multiple

    def input_image_sizes(self, request: Request) -> tuple[tuple[int, int], ...]:
        # with auto_resize, inputs of many sizes become one preferred resolution: those batch together
        return tuple((width, height) for height, width in map(self.input_size, request.images))

    def validate_inputs(self, images: Sequence[Any]) -> None:
        super().validate_inputs(images)
        for image in images:
            if 0 in self.input_size(image):
                multiple = self.size_multiple
                raise InvalidParameterError(
                    f"the input image is {image.width}x{image.height} pixels; {self.pipeline_class_name} needs at "
                    f"least {multiple}x{multiple}", param="image")

    # ------------------------------------------------------------------ latents
    def input_pixels(self, image: Image.Image) -> torch.Tensor:
        """An input image as the VAE encodes it (1 x 3 x H x W in [-1, 1]): resized to ``input_size``, then
        preprocessed at that size, as diffusers does."""
        processor = self.pipeline.image_processor
        height, width = self.input_size(image)
        return processor.preprocess(processor.resize(image, height, width), height, width)

    def request_latents(self, request: Request, dtype: torch.dtype) -> PackedLatents:
        p = request.params
        # the VAE encodes in argmax mode (draws nothing), so the generator then yields diffusers' noise
        noise, context, ids, context_ids = self.pipeline.prepare_latents(
            self.input_pixels(request.images[0]), request.num_outputs, self.latent_channels, p.height, p.width,
            dtype, self.device, request_generator(request))
        return PackedLatents(noise=noise, ids=torch.cat([ids, context_ids]), context=context)
