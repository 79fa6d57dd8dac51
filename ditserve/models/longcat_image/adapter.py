"""LongCat-Image (LongCatImagePipeline): a FLUX-like MMDiT (dual-stream then single-stream blocks) over packed 2x2
latents of a 16-channel VAE, conditioned on Qwen2.5-VL's last hidden states, flow matching.

Text: every prompt fills a fixed slot of 512 tokens (diffusers pads to it), so prompts of one batch stack without
padding or masks and share one set of text position ids. By default diffusers first *rewrites* the prompt with
the same Qwen2.5-VL (it generates a more descriptive prompt from a system message, up to 512 new tokens); so do
we, per request when it is admitted, through the pipeline's own ``rewire_prompt``.

Guidance: classifier-free guidance when ``guidance_scale > 1``, with the negative prompt (empty by default); the
guided prediction is then scaled down towards the conditional prediction's norm per token ("CFG renorm", with a
floor ``cfg_renorm_min``). The three ``__call__`` options that the sampling params have no field for,
``enable_prompt_rewrite``, ``enable_cfg_renorm`` and ``cfg_renorm_min``, are model-level settings here: read from
the model folder's ``ditserve_defaults.json`` ``sampling_defaults``, diffusers' defaults otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.longcat_image.pipeline_longcat_image import retrieve_timesteps

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.errors import InvalidParameterError, InvalidTypeError
from ditserve.models.base import (
    LoopAdapter,
    ModelKind,
    RequestMedia,
    RequestState,
    StepBatch,
    request_generator,
    stack_rows,
)
from ditserve.models.common import flow_match_shift, fresh_scheduler
from ditserve.models.qwen_image.processor import load_processor_without_video, torchvision_available
from ditserve.request import Request


@dataclass(frozen=True)
class LongCatOptions:
    """LongCatImagePipeline's model-level options, with diffusers' ``__call__`` defaults."""

    #: rewrite each prompt with the text encoder before encoding it
    enable_prompt_rewrite: bool = True
    #: scale the guided prediction down to at most the conditional prediction's norm, per token
    enable_cfg_renorm: bool = True
    #: the least that scale may be (1.0: never rescale)
    cfg_renorm_min: float = 0.0

    @classmethod
    def take_from(cls, model_defaults: dict[str, Any]) -> LongCatOptions:
        """The options in a model folder's defaults, removed from them (they are not sampling params)."""
        values = {f.name: model_defaults.pop(f.name) for f in fields(cls) if f.name in model_defaults}
        for name in ("enable_prompt_rewrite", "enable_cfg_renorm"):
            if name in values and not isinstance(values[name], bool):
                raise InvalidTypeError(f"{name} must be true or false, got {type(values[name]).__name__}",
                                       param=name)
        if "cfg_renorm_min" in values:
            value = values["cfg_renorm_min"]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InvalidTypeError(f"cfg_renorm_min must be a number, got {type(value).__name__}",
                                       param="cfg_renorm_min")
            if not 0.0 <= value <= 1.0:
                raise InvalidParameterError(f"cfg_renorm_min={value} must be in [0, 1]", param="cfg_renorm_min")
            values["cfg_renorm_min"] = float(value)
        return cls(**values)


def renormalized_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float, floor: float) -> torch.Tensor:
    """LongCat-Image's CFG renorm: the usual combination, scaled per token by the conditional prediction's norm
    over its own, clamped to [floor, 1] (it only ever shrinks, keeping strong guidance from over-saturating)."""
    guided = uncond + scale * (cond - uncond)
    ratio = torch.norm(cond, dim=-1, keepdim=True) / (torch.norm(guided, dim=-1, keepdim=True) + 1e-8)
    return guided * ratio.clamp(min=floor, max=1.0)


class LongCatAdapterBase(LoopAdapter):
    """What LongCat-Image and LongCat-Image-Edit share: the processor, guidance, transformer calls and decoding."""

    unsupported_params = ("true_cfg_scale", "guidance_scale_2", "boundary_ratio", "fps")
    guidance_note = "classifier-free guidance when > 1, against negative_prompt (empty by default)"

    @classmethod
    def preloaded_components(cls, path: str) -> dict[str, Any]:
        """The text processor, where transformers cannot load it (no torchvision for its video part)."""
        if torchvision_available():
            return {}
        return {"text_processor": load_processor_without_video(Path(path) / "text_processor")}

    # ------------------------------------------------------------------ params
    @staticmethod
    def _sampling_defaults() -> dict[str, Any]:
        """Defaults of both LongCat pipelines' ``__call__`` other than the size."""
        return {"num_inference_steps": 50, "guidance_scale": 4.5}

    def validate_params(self, params: OmniDiffusionSamplingParams) -> None:
        super().validate_params(params)
        name = self.pipeline_class_name
        if params.max_sequence_length is not None:
            raise InvalidParameterError(
                f"max_sequence_length is not a parameter of {name}: every prompt fills its fixed "
                f"{self.pipeline.tokenizer_max_length}-token slot", param="max_sequence_length")
        if params.negative_prompt is not None and params.guidance_scale is not None and params.guidance_scale <= 1:
            raise InvalidParameterError(
                f"negative_prompt is only used with guidance_scale > 1 (got {params.guidance_scale}) for {name}",
                param="negative_prompt")

    @staticmethod
    def uses_guidance(request: Request) -> bool:
        return request.params.guidance_scale > 1

    @staticmethod
    def unconditional_prompt(request: Request) -> str:
        """The unconditional branch's prompt: diffusers encodes an empty one when none is given."""
        negative = request.params.negative_prompt
        return "" if negative is None else negative

    # ------------------------------------------------------------------ prepare
    def _timesteps(self, scheduler: Any, num_steps: int, image_seq_len: int) -> torch.Tensor:
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
        timesteps, _ = retrieve_timesteps(scheduler, num_steps, self.device, sigmas=sigmas,
                                          mu=flow_match_shift(self.pipeline, image_seq_len))
        scheduler.set_begin_index(0)
        return timesteps

    def _state(self, request: Request, latents: torch.Tensor, conditioning: dict[str, Any]) -> RequestState:
        scheduler = fresh_scheduler(self.pipeline, request.params.flow_shift)
        return RequestState(request=request, latents=latents, scheduler=scheduler, conditioning=conditioning,
                            timesteps=self._timesteps(scheduler, request.params.num_inference_steps,
                                                      latents.shape[1]))

    @property
    def latent_channels(self) -> int:
        """Channels of the VAE latents (both pipelines hard-code 16, what the transformer's 64 packed ones hold)."""
        return self.pipeline.transformer.config.in_channels // 4

    # ------------------------------------------------------------------ denoise
    def _branch_inputs(self, batch: StepBatch, branch: str, states: Sequence[RequestState]) -> dict[str, Any]:
        """The transformer inputs of one guidance branch besides the latents and timesteps, stacked once while
        the batch's members stay. Position ids carry no batch dimension: requests of one step key have text and
        images of the same lengths, so the first request's serve every row."""
        prefix = "" if branch == "cond" else "neg_"

        def stack() -> dict[str, Any]:
            first = states[0].conditioning
            image_latents = [s.conditioning["image_latents"] for s in states]
            return {"encoder_hidden_states": stack_rows([s.conditioning[f"{prefix}prompt_embeds"] for s in states],
                                                        states),
                    "txt_ids": first[f"{prefix}text_ids"], "img_ids": first["image_ids"],
                    "image_latents": None if image_latents[0] is None else torch.cat(image_latents)}

        return batch.remember(branch, states, stack)

    def _call_branch(self, batch: StepBatch, branch: str, states: Sequence[RequestState]) -> torch.Tensor:
        inputs = dict(self._branch_inputs(batch, branch, states))
        latents = batch.latents(states)
        # the image tokens the transformer sees: the noisy latents, then the input image's latents (edit)
        image_latents = inputs.pop("image_latents")
        hidden = latents if image_latents is None else torch.cat([latents, image_latents], dim=1)
        timestep = batch.timesteps(states).to(latents.dtype) / 1000
        output = batch.call(branch, states, hidden_states=hidden, timestep=timestep, **inputs)
        # only the noisy latents' tokens are predicted; input-image tokens are context
        return output[:, :latents.shape[1]]

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, state: RequestState) -> torch.Tensor:
        """The guided prediction of one request's rows."""
        return uncond + state.params.guidance_scale * (cond - uncond)

    def predict(self, batch: StepBatch) -> torch.Tensor:
        return self.guided_prediction(batch, partial(self._call_branch, batch), self.guide)

    # ------------------------------------------------------------------ decode
    def decode(self, state: RequestState) -> RequestMedia:
        pipe, p = self.pipeline, state.params
        latents = pipe._unpack_latents(state.latents, p.height, p.width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        decoded = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(decoded, output_type="pil")


class LongCatImageAdapter(LongCatAdapterBase):
    pipeline_class_names = ("LongCatImagePipeline",)
    kind = ModelKind.IMAGE

    def __init__(self, pipeline: Any, model_defaults: Mapping[str, Any] | None = None) -> None:
        super().__init__(pipeline, model_defaults)
        self.options = LongCatOptions.take_from(self.model_defaults)

    def family_defaults(self) -> dict[str, Any]:
        size = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return {**self._sampling_defaults(), "height": size, "width": size}

    # ------------------------------------------------------------------ encode
    @property
    def rewrite_is_deterministic(self) -> bool:
        """Whether the prompt rewriting gives one text per prompt: greedy decoding, or sampling from the single
        most likely token (as Qwen2.5-VL-Instruct's generation config does)."""
        config = self.pipeline.text_encoder.generation_config
        return not config.do_sample or config.top_k == 1

    def prompt_cache_key(self, request: Request) -> tuple[Any, ...] | None:
        if self.options.enable_prompt_rewrite and not self.rewrite_is_deterministic:
            return None  # each encoding rewrites the prompt anew
        return (*super().prompt_cache_key(request), self.options.enable_prompt_rewrite)

    def _encode_text(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, text_ids = self.pipeline.encode_prompt(prompt=[text], num_images_per_prompt=1)
        return embeds, text_ids

    def encode_request(self, request: Request) -> dict[str, torch.Tensor]:
        prompt = request.prompt
        if self.options.enable_prompt_rewrite:
            prompt = self.pipeline.rewire_prompt(prompt, self.device)[0]
        embeds, text_ids = self._encode_text(prompt)
        encoded = {"prompt_embeds": embeds, "text_ids": text_ids}
        if self.uses_guidance(request):
            # diffusers never rewrites the negative prompt
            neg_embeds, neg_text_ids = self._encode_text(self.unconditional_prompt(request))
            encoded |= {"neg_prompt_embeds": neg_embeds, "neg_text_ids": neg_text_ids}
        return encoded

    # ------------------------------------------------------------------ prepare
    def prepare(self, request: Request, embeddings: dict[str, torch.Tensor]) -> RequestState:
        p = request.params
        latents, image_ids = self.pipeline.prepare_latents(
            request.num_outputs, self.latent_channels, p.height, p.width, embeddings["prompt_embeds"].dtype,
            self.device, request_generator(request))
        return self._state(request, latents, {**embeddings, "image_ids": image_ids, "image_latents": None})

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, state: RequestState) -> torch.Tensor:
        if not self.options.enable_cfg_renorm:
            return super().guide(cond, uncond, state)
        return renormalized_cfg(cond, uncond, state.params.guidance_scale, self.options.cfg_renorm_min)
