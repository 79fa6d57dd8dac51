"""Qwen-Image and Qwen-Image-2512 (QwenImagePipeline): a 60-block dual-stream MMDiT over packed 2x2 latents of a
causal 3D VAE, conditioned on Qwen2.5-VL's last hidden states, flow matching.

Guidance: "true" classifier-free guidance with a negative prompt and ``true_cfg_scale > 1`` runs a second,
unconditional pass; diffusers then rescales the combined prediction to the conditional prediction's norm (per
token), and so do we. Prompts of one batch have different lengths: their embeddings are zero-padded to the
longest and the padding is masked out of attention, as diffusers does for a list of prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.qwenimage.pipeline_qwenimage import retrieve_timesteps

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.errors import InvalidParameterError
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
from ditserve.request import Request

#: diffusers' Qwen pipelines refuse longer prompt embeddings
MAX_SEQUENCE_LENGTH = 1024


def norm_preserving_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG: the usual combination, rescaled to the conditional prediction's norm per token
    (keeps strong guidance from over-saturating)."""
    combined = uncond + scale * (cond - uncond)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    combined_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (cond_norm / combined_norm)


def pad_and_mask(per_request: Sequence[torch.Tensor], states: Sequence[RequestState]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack per-request text embeddings (1 x L_i x D) into rows, zero-padded to the longest, with the mask
    diffusers builds for a batch (1 = token, 0 = padding); no mask when nothing was padded, as diffusers."""
    longest = max(e.shape[1] for e in per_request)
    padded = [torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[1])) for e in per_request]
    embeds = stack_rows(padded, states)
    if all(e.shape[1] == longest for e in per_request):
        return embeds, None
    positions = torch.arange(longest, device=embeds.device)
    masks = [(positions < e.shape[1]).long().unsqueeze(0) for e in per_request]
    return embeds, stack_rows(masks, states)


class QwenImageAdapter(LoopAdapter):
    pipeline_class_names = ("QwenImagePipeline",)
    kind = ModelKind.IMAGE

    # ------------------------------------------------------------------ params
    def family_defaults(self) -> dict[str, Any]:
        size = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return {**self._sampling_defaults(), "height": size, "width": size}

    @staticmethod
    def _sampling_defaults() -> dict[str, Any]:
        """Defaults of diffusers' Qwen pipelines' ``__call__`` other than the size."""
        return {"num_inference_steps": 50, "true_cfg_scale": 4.0, "max_sequence_length": 512}

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.pipeline.transformer.config.guidance_embeds)

    def resolve_params(self, params: OmniDiffusionSamplingParams) -> OmniDiffusionSamplingParams:
        # diffusers only warns when true CFG is asked for without a negative prompt, and runs without it;
        # an option that would be ignored is an error here (checked before the family default 4.0 fills in)
        negative_prompt = params.negative_prompt or self.model_defaults.get("negative_prompt")
        if params.true_cfg_scale is not None and params.true_cfg_scale > 1 and negative_prompt is None:
            raise InvalidParameterError(
                f"true_cfg_scale={params.true_cfg_scale} needs a negative_prompt for {self.pipeline_class_name} "
                "(true CFG runs only with one; pass negative_prompt=' ' for an empty one)", param="true_cfg_scale")
        return super().resolve_params(params)

    def validate_params(self, params: OmniDiffusionSamplingParams) -> None:
        super().validate_params(params)
        name = self.pipeline_class_name
        if params.max_sequence_length is not None and params.max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise InvalidParameterError(
                f"max_sequence_length={params.max_sequence_length} must be <= {MAX_SEQUENCE_LENGTH} for {name}",
                param="max_sequence_length")
        if params.negative_prompt is not None and params.true_cfg_scale is not None and params.true_cfg_scale <= 1:
            raise InvalidParameterError(
                f"negative_prompt is only used with true_cfg_scale > 1 (got {params.true_cfg_scale}) for {name}",
                param="negative_prompt")
        if self.guidance_embeds and params.guidance_scale is None:
            raise InvalidParameterError(f"{name} is guidance-distilled: guidance_scale is required",
                                        param="guidance_scale")
        if not self.guidance_embeds and params.guidance_scale is not None:
            raise InvalidParameterError(
                f"guidance_scale is only for guidance-distilled models; {name} uses true_cfg_scale with "
                "negative_prompt", param="guidance_scale")
        for unused in ("guidance_scale_2", "boundary_ratio", "fps"):
            if getattr(params, unused) is not None:
                raise InvalidParameterError(f"{unused} is not used by {name}", param=unused)

    @staticmethod
    def uses_guidance(request: Request) -> bool:
        p = request.params
        return p.true_cfg_scale is not None and p.true_cfg_scale > 1 and p.negative_prompt is not None


    # ------------------------------------------------------------------ encode
    def _encode_text(self, text: str, request: Request) -> torch.Tensor:
        """One prompt's embeddings (1 x L x D). Alone in its batch it needs no mask (diffusers returns None)."""
        embeds, _ = self.pipeline.encode_prompt(
            prompt=[text], device=self.device, num_images_per_prompt=1,
            max_sequence_length=request.params.max_sequence_length)
        return embeds

    def encode_request(self, request: Request) -> dict[str, torch.Tensor]:
        encoded = {"prompt_embeds": self._encode_text(request.prompt, request)}
        if self.uses_guidance(request):
            encoded["neg_prompt_embeds"] = self._encode_text(request.params.negative_prompt, request)
        return encoded

    # ------------------------------------------------------------------ prepare
    def output_size(self, request: Request) -> tuple[int, int]:
        """(height, width) of the request's output."""
        return request.params.height, request.params.width

    def latent_grid(self, height: int, width: int) -> tuple[int, int, int]:
        """(frames, rows, columns) of packed latent patches of an image, as the transformer's RoPE reads it."""
        factor = self.pipeline.vae_scale_factor
        return 1, height // factor // 2, width // factor // 2

    def request_latents(self, request: Request, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The request's initial noise from its own generator (packed, one row per output), and the packed
        latents of its input images (None here; edit models have them)."""
        height, width = self.output_size(request)
        channels = self.pipeline.transformer.config.in_channels // 4
        noise = self.pipeline.prepare_latents(request.num_outputs, channels, height, width, dtype, self.device,
                                              request_generator(request))
        return noise, None

    def image_shapes(self, request: Request) -> list[tuple[int, int, int]]:
        """The latent grid of every image the transformer sees for this request (output first)."""
        return [self.latent_grid(*self.output_size(request))]

    def _timesteps(self, scheduler: Any, num_steps: int, noise: torch.Tensor,
                   image_latents: torch.Tensor | None) -> torch.Tensor:
        """The request's schedule, shifted by the noisy latents' token count."""
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        timesteps, _ = retrieve_timesteps(scheduler, num_steps, self.device, sigmas=sigmas,
                                          mu=flow_match_shift(self.pipeline, noise.shape[1]))
        scheduler.set_begin_index(0)
        return timesteps

    def _guidance(self, rows: int, params: OmniDiffusionSamplingParams) -> torch.Tensor | None:
        if not self.guidance_embeds:
            return None
        return torch.full([1], params.guidance_scale, device=self.device, dtype=torch.float32).expand(rows)

    def prepare(self, request: Request, embeddings: dict[str, torch.Tensor]) -> RequestState:
        noise, image_latents = self.request_latents(request, embeddings["prompt_embeds"].dtype)
        scheduler = fresh_scheduler(self.pipeline, request.params.flow_shift)
        conditioning = {**embeddings, "image_latents": image_latents,
                        "guidance": self._guidance(noise.shape[0], request.params)}
        return RequestState(request=request, latents=noise, scheduler=scheduler, conditioning=conditioning,
                            timesteps=self._timesteps(scheduler, request.params.num_inference_steps, noise,
                                                      image_latents))

    # ------------------------------------------------------------------ denoise
    def _branch_inputs(self, batch: StepBatch, branch: str, states: Sequence[RequestState]) -> dict[str, Any]:
        """What the transformer needs besides the latents and timesteps, built once while the members stay.
        Prompts of one batch have different lengths: zero-padded to the longest and masked, as diffusers does
        for a list of prompts."""
        key = "prompt_embeds" if branch == "cond" else "neg_prompt_embeds"

        def build() -> dict[str, Any]:
            embeds, mask = pad_and_mask([s.conditioning[key] for s in states], states)
            guidance = [s.conditioning["guidance"] for s in states]
            image_latents = [s.conditioning["image_latents"] for s in states]
            return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask,
                    "img_shapes": [self.image_shapes(s.request) for s in states for _ in range(s.num_rows)],
                    "guidance": None if guidance[0] is None else torch.cat(guidance),
                    "image_latents": None if image_latents[0] is None else torch.cat(image_latents),
                    **self._extra_inputs(states)}

        return batch.remember(branch, states, build)

    def _extra_inputs(self, states: Sequence[RequestState]) -> dict[str, Any]:
        """Transformer inputs a variant of the family adds for the rows of ``states`` (none here)."""
        return {}

    def _call_branch(self, batch: StepBatch, branch: str, states: Sequence[RequestState]) -> torch.Tensor:
        inputs = dict(self._branch_inputs(batch, branch, states))
        latents = batch.latents(states)
        timestep = batch.timesteps(states).to(latents.dtype)
        # edit models: the input images' latents follow the noisy ones as context tokens
        return batch.call_with_context(branch, states, latents, inputs.pop("image_latents"),
                                       timestep=timestep / 1000, **inputs)

    def predict(self, batch: StepBatch) -> torch.Tensor:
        return self.guided_prediction(batch, partial(self._call_branch, batch),
                                      lambda c, u, s: norm_preserving_cfg(c, u, s.params.true_cfg_scale))

    # ------------------------------------------------------------------ decode
    def _denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents from the model's normalised ones, written as diffusers writes it (bit-for-bit)."""
        config = self.pipeline.vae.config
        mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(
            latents.device, latents.dtype)
        return latents / inverse_std + mean

    def decode(self, state: RequestState) -> RequestMedia:
        pipe = self.pipeline
        height, width = self.output_size(state.request)
        latents = pipe._unpack_latents(state.latents, height, width, pipe.vae_scale_factor).to(pipe.vae.dtype)
        # the VAE is a video VAE: decode one frame and drop the frame axis
        decoded = pipe.vae.decode(self._denormalize(latents), return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(decoded, output_type="pil")
