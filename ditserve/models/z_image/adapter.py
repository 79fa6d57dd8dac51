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
from functools import partial
from typing import Any

import torch
from diffusers.pipelines.z_image.pipeline_z_image import get_default_z_image_sigmas, retrieve_timesteps

from ditserve.errors import InvalidParameterError, InvalidTypeError
from ditserve.models.base import LoopAdapter, RequestMedia, RequestState, StepBatch, request_generator
from ditserve.models.common import flow_match_shift, fresh_scheduler
from ditserve.request import Request

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
    # the transformer takes a list of samples and packs them itself: per-row LoRA there is not verified
    lora_per_row = False
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

    def prepare(self, request: Request, embeddings: dict[str, list[torch.Tensor]]) -> RequestState:
        pipe, p = self.pipeline, request.params
        latents = pipe.prepare_latents(request.num_outputs, pipe.transformer.in_channels, p.height, p.width,
                                       torch.float32, self.device, request_generator(request))
        scheduler = fresh_scheduler(pipe, p.flow_shift)
        image_seq_len = (latents.shape[2] // 2) * (latents.shape[3] // 2)
        timesteps, _ = retrieve_timesteps(scheduler, p.num_inference_steps, self.device,
                                          sigmas=get_default_z_image_sigmas(p.num_inference_steps),
                                          mu=flow_match_shift(pipe, image_seq_len))
        scheduler.set_begin_index(0)
        conditioning = {**embeddings, "guidance_scales": self._guidance_per_step(timesteps, request)}
        return RequestState(request=request, latents=latents, scheduler=scheduler, timesteps=timesteps,
                            conditioning=conditioning)

    def _guidance_per_step(self, timesteps: torch.Tensor, request: Request) -> list[float]:
        """The guidance scale of each step: 0 (no negative pass) where ``cfg_truncation`` switches it off."""
        scale = request.params.guidance_scale
        truncation = self.cfg_options["cfg_truncation"]
        if not self.uses_guidance(request) or truncation > 1:
            return [scale] * len(timesteps)
        normalized_times = ((1000 - timesteps.float()) / 1000).tolist()
        return [0.0 if time > truncation else scale for time in normalized_times]

    def guided(self, state: RequestState) -> bool:
        return state.conditioning["guidance_scales"][state.step_index] > 0

    def _call_branch(self, batch: StepBatch, branch: str, states: Sequence[RequestState]) -> torch.Tensor:
        key = "prompt_embeds" if branch == "cond" else "neg_prompt_embeds"
        # captions keep their own lengths: one list entry per latent row, repeated per output as diffusers does
        captions = [row for s in states for row in s.conditioning[key] * s.num_rows]
        latents = batch.latents(states)
        timestep = (1000 - batch.timesteps(states)) / 1000
        # the transformer wants one (channels, frames=1, height, width) tensor per sample
        samples = list(latents.to(self.pipeline.transformer.dtype).unsqueeze(2).unbind(dim=0))
        output = batch.call(branch, states, x=samples, t=timestep, cap_feats=captions)
        return torch.stack([sample.float() for sample in output])

    def predict(self, batch: StepBatch) -> torch.Tensor:
        prediction = self.guided_prediction(batch, partial(self._call_branch, batch), self._guide_rows)
        # the model predicts the negated flow-matching velocity
        return -prediction.squeeze(2).to(torch.float32)

    def _guide_rows(self, pos: torch.Tensor, neg: torch.Tensor, state: RequestState) -> torch.Tensor:
        scale = state.conditioning["guidance_scales"][state.step_index]
        return torch.stack([self._guide(p, n, scale) for p, n in zip(pos, neg, strict=True)])

    def _guide(self, pos: torch.Tensor, neg: torch.Tensor, scale: float) -> torch.Tensor:
        guided = pos + scale * (pos - neg)
        max_ratio = self.cfg_options["cfg_normalization"]
        if max_ratio > 0:
            max_norm = torch.linalg.vector_norm(pos) * max_ratio
            guided_norm = torch.linalg.vector_norm(guided)
            if guided_norm > max_norm:
                guided = guided * (max_norm / guided_norm)
        return guided

    def decode(self, state: RequestState) -> RequestMedia:
        vae = self.pipeline.vae
        latents = state.latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        decoded = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(decoded, output_type="pil")
