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
from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

from ditserve.engine.request import Request
from ditserve.errors import InvalidParameterError
from ditserve.models.base import DenoiseState, LoopAdapter, RequestMedia, request_generator, stack_rows
from ditserve.models.common import flow_match_shift, fresh_scheduler, split_rows

#: diffusers' StableDiffusion3Pipeline rejects longer T5 sequences
MAX_SEQUENCE_LENGTH = 512
#: batch tensors built by ``collate``; the negative ones only exist with guidance
EMBEDDING_KEYS = ("prompt_embeds", "pooled", "neg_prompt_embeds", "neg_pooled")


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

    def collate(self, embeddings: Sequence[dict[str, torch.Tensor]], requests: Sequence[Request]) -> dict[str, Any]:
        return {key: stack_rows([e[key] for e in embeddings], requests)
                for key in EMBEDDING_KEYS if key in embeddings[0]}

    def prepare(self, requests: Sequence[Request], conditioning: dict[str, Any]) -> DenoiseState:
        pipe, p = self.pipeline, requests[0].params
        channels = pipe.transformer.config.in_channels
        latents = torch.cat([
            pipe.prepare_latents(request.num_outputs, channels, p.height, p.width,
                                 conditioning["prompt_embeds"].dtype, self.device, request_generator(request))
            for request in requests])

        scheduler = fresh_scheduler(pipe)
        shift_kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", None):
            patch = pipe.transformer.config.patch_size
            image_seq_len = (latents.shape[2] // patch) * (latents.shape[3] // patch)
            shift_kwargs["mu"] = flow_match_shift(pipe, image_seq_len)
        timesteps, _ = retrieve_timesteps(scheduler, p.num_inference_steps, self.device, **shift_kwargs)
        extra = {**conditioning, "cfg": self.uses_guidance(requests[0])}
        return DenoiseState(latents=latents, timesteps=timesteps, scheduler=scheduler, requests=requests,
                            extra=extra)

    def predict(self, state: DenoiseState, step_index: int, t: torch.Tensor) -> torch.Tensor:
        x = state.extra
        common = {"hidden_states": state.latents, "timestep": t.expand(state.latents.shape[0])}
        cond = self.call_transformer("cond", encoder_hidden_states=x["prompt_embeds"],
                                     pooled_projections=x["pooled"], **common)
        if not x["cfg"]:
            return cond
        uncond = self.call_transformer("uncond", encoder_hidden_states=x["neg_prompt_embeds"],
                                       pooled_projections=x["neg_pooled"], **common)
        return uncond + state.params.guidance_scale * (cond - uncond)

    def decode(self, state: DenoiseState) -> list[RequestMedia]:
        vae = self.pipeline.vae
        latents = state.latents / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        images = self.pipeline.image_processor.postprocess(decoded, output_type="pil")
        return split_rows(images, state.requests)
