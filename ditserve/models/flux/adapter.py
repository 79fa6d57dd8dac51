"""FLUX.1 (FluxPipeline): dual-stream + single-stream MMDiT with packed 2x2 latents, flow matching.

Guidance: FLUX.1-dev embeds ``guidance_scale`` in the transformer (no extra pass); "true" CFG with a negative
prompt and ``true_cfg_scale > 1`` runs a second, unconditional pass, as diffusers' FluxPipeline does.
The bundled demo model is a FLUX-architecture model and uses this adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

from ditserve.engine.request import Request
from ditserve.models.base import DenoiseState, LoopAdapter, RequestMedia, request_generator, stack_rows
from ditserve.models.common import flow_match_shift, fresh_scheduler, split_rows


class FluxAdapter(LoopAdapter):
    pipeline_class_names = ("FluxPipeline",)

    def family_defaults(self) -> dict[str, Any]:
        size = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return {"num_inference_steps": 28, "guidance_scale": 3.5, "true_cfg_scale": 1.0,
                "max_sequence_length": 512, "height": size, "width": size}

    def validate_params(self, params: Any) -> None:
        super().validate_params(params)
        from ditserve.errors import InvalidParameterError

        if params.max_sequence_length is not None and params.max_sequence_length > 512:
            raise InvalidParameterError(
                f"max_sequence_length={params.max_sequence_length} must be <= 512 for FLUX",
                param="max_sequence_length")

    @staticmethod
    def uses_guidance(request: Request) -> bool:
        p = request.params
        return p.true_cfg_scale is not None and p.true_cfg_scale > 1 and p.negative_prompt is not None


    def _encode_text(self, text: str, max_sequence_length: int) -> tuple[torch.Tensor, ...]:
        embeds, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=[text], prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=max_sequence_length)
        return embeds, pooled, text_ids

    def encode_request(self, request: Request) -> dict[str, Any]:
        p = request.params
        embeds, pooled, text_ids = self._encode_text(request.prompt, p.max_sequence_length)
        encoded = {"prompt_embeds": embeds, "pooled": pooled, "text_ids": text_ids}
        if self.uses_guidance(request):
            neg_embeds, neg_pooled, neg_ids = self._encode_text(p.negative_prompt, p.max_sequence_length)
            encoded |= {"neg_prompt_embeds": neg_embeds, "neg_pooled": neg_pooled, "neg_text_ids": neg_ids}
        return encoded

    def collate(self, embeddings: Sequence[dict[str, Any]], requests: Sequence[Request]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in ("prompt_embeds", "pooled", "neg_prompt_embeds", "neg_pooled"):
            if key in embeddings[0]:
                batch[key] = stack_rows([e[key] for e in embeddings], requests)
        # text ids carry no batch dimension: the same for every row
        batch["text_ids"] = embeddings[0]["text_ids"]
        if "neg_text_ids" in embeddings[0]:
            batch["neg_text_ids"] = embeddings[0]["neg_text_ids"]
        return batch

    def prepare(self, requests: Sequence[Request], conditioning: dict[str, Any]) -> DenoiseState:
        pipe, p = self.pipeline, requests[0].params
        channels = pipe.transformer.config.in_channels // 4
        latents, image_ids = [], None
        for request in requests:
            request_latents, image_ids = pipe.prepare_latents(
                request.num_outputs, channels, p.height, p.width, conditioning["prompt_embeds"].dtype,
                self.device, request_generator(request))
            latents.append(request_latents)
        packed = torch.cat(latents, dim=0)

        scheduler = fresh_scheduler(pipe)
        steps = p.num_inference_steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas,
                                          mu=flow_match_shift(pipe, packed.shape[1]))
        scheduler.set_begin_index(0)

        guidance = None
        if pipe.transformer.config.guidance_embeds:
            guidance = torch.full([packed.shape[0]], p.guidance_scale, device=self.device, dtype=torch.float32)
        extra = {**conditioning, "image_ids": image_ids, "guidance": guidance,
                 "true_cfg": self.uses_guidance(requests[0])}
        return DenoiseState(latents=packed, timesteps=timesteps, scheduler=scheduler, requests=requests,
                            extra=extra)

    def predict(self, state: DenoiseState, step_index: int, t: torch.Tensor) -> torch.Tensor:
        x = state.extra
        timestep = t.expand(state.latents.shape[0]).to(state.latents.dtype) / 1000
        common = {"hidden_states": state.latents, "timestep": timestep, "guidance": x["guidance"],
                  "img_ids": x["image_ids"]}
        cond = self.call_transformer("cond", pooled_projections=x["pooled"],
                                     encoder_hidden_states=x["prompt_embeds"], txt_ids=x["text_ids"], **common)
        if not x["true_cfg"]:
            return cond
        uncond = self.call_transformer("uncond", pooled_projections=x["neg_pooled"],
                                       encoder_hidden_states=x["neg_prompt_embeds"], txt_ids=x["neg_text_ids"],
                                       **common)
        return uncond + state.params.true_cfg_scale * (cond - uncond)

    def decode(self, state: DenoiseState) -> list[RequestMedia]:
        pipe, p = self.pipeline, state.params
        latents = pipe._unpack_latents(state.latents, p.height, p.width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        decoded = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        images = pipe.image_processor.postprocess(decoded, output_type="pil")
        return split_rows(images, state.requests)
