"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): MMDiT over 2x2-patched latents, flow matching.

Three text encoders (CLIP-L, CLIP-G, T5): diffusers' ``encode_prompt`` concatenates the two CLIP hidden states,
pads them to T5's width and appends the T5 tokens; the pooled CLIP outputs condition the timestep embedding.
Classic classifier-free guidance with ``guidance_scale > 1``. diffusers runs [uncond, cond] as one batch of 2B;
we run the two branches as two calls (so caches keep per-branch state), which changes nothing but float
rounding: 0-1/255 from diffusers in fp32; in bf16 on CUDA up to 14/255 on the tiny test model, whose outputs
are themselves ~170/255 from fp32 there, and ours are no farther from fp32 than diffusers' own.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

from ditserve.errors import InvalidParameterError
from ditserve.models.base import (
    LoopAdapter,
    RequestMedia,
    RequestState,
    StepBatch,
    request_generator,
    stack_rows,
)
from ditserve.models.common import flow_match_shift, fresh_scheduler
from ditserve.request import Request

#: diffusers' StableDiffusion3Pipeline rejects longer T5 sequences
MAX_SEQUENCE_LENGTH = 512


class StableDiffusion3Adapter(LoopAdapter):
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    unsupported_params = ("true_cfg_scale", "guidance_scale_2", "boundary_ratio", "fps")
    guidance_note = "classifier-free guidance when > 1"

    @property
    def size_multiple(self) -> int:
        return self.pipeline.vae_scale_factor * self.pipeline.patch_size

    def family_defaults(self) -> dict[str, Any]:
        size = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return {"num_inference_steps": 28, "guidance_scale": 7.0, "max_sequence_length": 256,
                "height": size, "width": size}

    def validate_params(self, params: Any) -> None:
        super().validate_params(params)
        if params.max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise InvalidParameterError(
                f"max_sequence_length={params.max_sequence_length} must be <= {MAX_SEQUENCE_LENGTH} for SD3",
                param="max_sequence_length")
        if params.negative_prompt is not None and params.guidance_scale <= 1:
            raise InvalidParameterError(
                f"negative_prompt needs guidance_scale > 1 (got {params.guidance_scale}): SD3 only runs the "
                "negative branch with classifier-free guidance", param="negative_prompt")

    @staticmethod
    def uses_guidance(request: Request) -> bool:
        return request.params.guidance_scale > 1


    def encode_request(self, request: Request) -> dict[str, torch.Tensor]:
        p = request.params
        embeds, neg_embeds, pooled, neg_pooled = self.pipeline.encode_prompt(
            prompt=[request.prompt], prompt_2=None, prompt_3=None, negative_prompt=p.negative_prompt,
            do_classifier_free_guidance=self.uses_guidance(request), device=self.device, num_images_per_prompt=1,
            max_sequence_length=p.max_sequence_length)
        encoded = {"prompt_embeds": embeds, "pooled": pooled}
        if self.uses_guidance(request):
            encoded |= {"neg_prompt_embeds": neg_embeds, "neg_pooled": neg_pooled}
        return encoded

    def prepare(self, request: Request, embeddings: dict[str, torch.Tensor]) -> RequestState:
        pipe, p = self.pipeline, request.params
        latents = pipe.prepare_latents(request.num_outputs, pipe.transformer.config.in_channels, p.height, p.width,
                                       embeddings["prompt_embeds"].dtype, self.device, request_generator(request))
        scheduler = fresh_scheduler(pipe, p.flow_shift)
        shift_kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            image_seq_len = (latents.shape[2] // patch) * (latents.shape[3] // patch)
            shift_kwargs["mu"] = flow_match_shift(pipe, image_seq_len)
        timesteps, _ = retrieve_timesteps(scheduler, p.num_inference_steps, self.device, **shift_kwargs)
        return RequestState(request=request, latents=latents, scheduler=scheduler, timesteps=timesteps,
                            conditioning=embeddings)

    def _call_branch(self, batch: StepBatch, branch: str, states: Sequence[RequestState]) -> torch.Tensor:
        prefix = "" if branch == "cond" else "neg_"
        text = batch.remember(branch, states, lambda: {
            "encoder_hidden_states": stack_rows([s.conditioning[f"{prefix}prompt_embeds"] for s in states], states),
            "pooled_projections": stack_rows([s.conditioning[f"{prefix}pooled"] for s in states], states)})
        return batch.call(branch, states, hidden_states=batch.latents(states), timestep=batch.timesteps(states),
                          **text)

    def predict(self, batch: StepBatch) -> torch.Tensor:
        return self.guided_prediction(batch, partial(self._call_branch, batch),
                                      lambda c, u, s: u + s.params.guidance_scale * (c - u))

    def decode(self, state: RequestState) -> RequestMedia:
        vae = self.pipeline.vae
        latents = state.latents / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(decoded, output_type="pil")
