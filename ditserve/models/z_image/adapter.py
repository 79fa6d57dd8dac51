"""Z-Image (ZImagePipeline): single-stream DiT conditioned on Qwen3 hidden states, flow matching.

The transformer takes *lists* of per-sample tensors (each caption keeps its own length, no padding) and
predicts the negated velocity at time ``(1000 - t) / 1000``. Guidance is on when ``guidance_scale > 0`` and reads
``pos + scale * (pos - neg)``. Two more guidance options of diffusers' ``__call__``, ``cfg_normalization`` (cap
the guided prediction's norm at that multiple of the conditional one's) and ``cfg_truncation`` (no guidance once
``(1000 - t) / 1000`` exceeds it), are model-level settings here: they are read from the model folder's
``ditserve_defaults.json`` ``sampling_defaults`` (the sampling params have no per-request field for them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas, retrieve_timesteps

from ditserve.engine.request import Request
from ditserve.errors import InvalidParameterError, InvalidTypeError
from ditserve.models.base import DenoiseState, LoopAdapter, RequestMedia, request_generator
from ditserve.models.common import flow_match_shift, fresh_scheduler, split_rows

#: diffusers' defaults: no norm cap, guidance at every step
CFG_OPTION_DEFAULTS = {"cfg_normalization": 0.0, "cfg_truncation": 1.0}


def _cfg_options(model_defaults: dict[str, Any]) -> dict[str, float]:
    """Take the model-level guidance options out of the folder's defaults (they are not sampling params)."""
    options = dict(CFG_OPTION_DEFAULTS)
    for name in CFG_OPTION_DEFAULTS:
        if name not in model_defaults:
            continue
        value = model_defaults.pop(name)
        if not isinstance(value, (bool, int, float)):
            raise InvalidTypeError(f"{name} must be a number (or a bool), got {type(value).__name__}", param=name)
        if float(value) < 0:
            raise InvalidParameterError(f"{name}={value} must be >= 0", param=name)
        options[name] = float(value)
    return options


class ZImageAdapter(LoopAdapter):
    pipeline_class_names = ("ZImagePipeline",)
    unsupported_params = ("true_cfg_scale", "guidance_scale_2", "boundary_ratio", "fps")
    guidance_note = "classifier-free guidance when > 0"

    def __init__(self, pipeline: Any, model_defaults: Mapping[str, Any] | None = None) -> None:
        super().__init__(pipeline, model_defaults)
        self.cfg_options = _cfg_options(self.model_defaults)

    def family_defaults(self) -> dict[str, Any]:
        return {"num_inference_steps": 50, "guidance_scale": 5.0, "max_sequence_length": 512,
                "height": 1024, "width": 1024}

    def validate_params(self, params: Any) -> None:
        super().validate_params(params)
        if params.negative_prompt is not None and params.guidance_scale <= 0:
            raise InvalidParameterError(
                "negative_prompt needs guidance_scale > 0: Z-Image only runs the negative branch with "
                "classifier-free guidance", param="negative_prompt")

    @staticmethod
    def uses_guidance(request: Request) -> bool:
        return request.params.guidance_scale > 0


    def encode_request(self, request: Request) -> dict[str, list[torch.Tensor]]:
        p = request.params
        negative = None if p.negative_prompt is None else [p.negative_prompt]
        embeds, neg_embeds = self.pipeline.encode_prompt(
            prompt=[request.prompt], negative_prompt=negative, do_classifier_free_guidance=self.uses_guidance(request),
            device=self.device, max_sequence_length=p.max_sequence_length)
        return {"prompt_embeds": embeds, "neg_prompt_embeds": neg_embeds}

    def collate(self, embeddings: Sequence[dict[str, list[torch.Tensor]]],
                requests: Sequence[Request]) -> dict[str, Any]:
        # captions keep their own lengths: one list entry per latent row, repeated per output as diffusers does
        return {key: [row for e, r in zip(embeddings, requests, strict=True) for row in e[key] * r.num_outputs]
                for key in ("prompt_embeds", "neg_prompt_embeds")}

    def prepare(self, requests: Sequence[Request], conditioning: dict[str, Any]) -> DenoiseState:
        pipe, p = self.pipeline, requests[0].params
        latents = torch.cat([
            pipe.prepare_latents(request.num_outputs, pipe.transformer.in_channels, p.height, p.width,
                                 torch.float32, self.device, request_generator(request))
            for request in requests])

        scheduler = fresh_scheduler(pipe)
        image_seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
        timesteps, _ = retrieve_timesteps(scheduler, p.num_inference_steps, self.device,
                                          sigmas=get_default_z_image_sigmas(p.num_inference_steps),
                                          mu=flow_match_shift(pipe, image_seq_len))
        scheduler.set_begin_index(0)
        extra = {**conditioning, "guidance_scales": self._guidance_per_step(timesteps, requests[0])}
        return DenoiseState(latents=latents, timesteps=timesteps, scheduler=scheduler, requests=requests,
                            extra=extra)

    def _guidance_per_step(self, timesteps: torch.Tensor, request: Request) -> list[float]:
        """The guidance scale of each step: 0 (no negative pass) where ``cfg_truncation`` switches it off."""
        scale = request.params.guidance_scale
        truncation = self.cfg_options["cfg_truncation"]
        if not self.uses_guidance(request) or truncation > 1:
            return [scale] * len(timesteps)
        normalized_times = ((1000 - timesteps.float()) / 1000).tolist()
        return [0.0 if time > truncation else scale for time in normalized_times]

    def predict(self, state: DenoiseState, step_index: int, t: torch.Tensor) -> torch.Tensor:
        x = state.extra
        timestep = (1000 - t.expand(state.latents.shape[0])) / 1000
        # the transformer wants one (channels, frames=1, height, width) tensor per sample
        samples = list(state.latents.to(self.pipeline.transformer.dtype).unsqueeze(2).unbind(dim=0))
        cond = self.call_transformer("cond", x=samples, t=timestep, cap_feats=x["prompt_embeds"])
        scale = x["guidance_scales"][step_index]
        if scale > 0:
            uncond = self.call_transformer("uncond", x=samples, t=timestep, cap_feats=x["neg_prompt_embeds"])
            prediction = torch.stack([self._guide(pos.float(), neg.float(), scale)
                                      for pos, neg in zip(cond, uncond, strict=True)])
        else:
            prediction = torch.stack([pos.float() for pos in cond])
        # the model predicts the negated flow-matching velocity
        return -prediction.squeeze(2).to(torch.float32)

    def _guide(self, pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
        guided = pos + scale * (pos - neg)
        max_ratio = self.cfg_options["cfg_normalization"]
        if max_ratio > 0:
            max_norm = torch.linalg.vector_norm(pos) * max_ratio
            guided_norm = torch.linalg.vector_norm(guided)
            if guided_norm > max_norm:
                guided = guided * (max_norm / guided_norm)
        return guided

    def decode(self, state: DenoiseState) -> list[RequestMedia]:
        vae = self.pipeline.vae
        latents = state.latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(latents, return_dict=False)[0]
        images = self.pipeline.image_processor.postprocess(decoded, output_type="pil")
        return split_rows(images, state.requests)
