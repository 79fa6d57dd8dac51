"""Wan2.1 / Wan2.2 text-to-video (WanPipeline): 3D-patched video latents, UMT5 text, flow matching.

Classic classifier-free guidance with ``guidance_scale > 1``. The Wan2.2 A14B layout has two experts:
``transformer`` denoises while ``t >= boundary_ratio * num_train_timesteps`` (high noise) with
``guidance_scale``, then ``transformer_2`` with ``guidance_scale_2`` (default: ``guidance_scale``).
``boundary_ratio`` defaults to the pipeline's config and may be set per request on a two-expert model.
Wan2.2 TI2V-5B's ``expand_timesteps`` (one timestep per latent token) is honoured too.
Output: one uint8 video (frames x H x W x 3) per output; ``fps`` (default 16) travels with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

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
from ditserve.models.common import check_num_frames, fresh_scheduler, to_uint8_video
from ditserve.request import Request


class WanAdapter(LoopAdapter):
    pipeline_class_names = ("WanPipeline",)
    unsupported_params = ("true_cfg_scale",)
    guidance_note = "and guidance_scale_2 for the low-noise expert of two-expert models"
    kind = ModelKind.VIDEO
    transformer_names = ("transformer", "transformer_2")

    # ------------------------------------------------------------------ model facts
    @property
    def has_two_experts(self) -> bool:
        return getattr(self.pipeline, "transformer_2", None) is not None

    def _any_transformer(self) -> torch.nn.Module:
        return self.transformers()[0]

    @property
    def size_multiple(self) -> int:
        # diffusers' check_inputs wants multiples of 16, patchification multiples of VAE factor x patch size
        _, patch_h, patch_w = self._any_transformer().config.patch_size
        spatial = self.pipeline.vae_scale_factor_spatial
        return math.lcm(16, spatial * patch_h, spatial * patch_w)

    # ------------------------------------------------------------------ params
    def family_defaults(self) -> dict[str, Any]:
        return {"num_inference_steps": 50, "guidance_scale": 5.0, "max_sequence_length": 512, "height": 480,
                "width": 832, "num_frames": 81, "fps": 16, "boundary_ratio": self.pipeline.config.boundary_ratio}

    def validate_params(self, params: Any) -> None:
        super().validate_params(params)
        check_num_frames(params.num_frames, self.pipeline.vae_scale_factor_temporal)
        self._validate_experts(params)
        if params.negative_prompt is not None and params.guidance_scale <= 1:
            raise InvalidParameterError(
                f"negative_prompt needs guidance_scale > 1 (got {params.guidance_scale}): Wan only runs the "
                "negative branch with classifier-free guidance", param="negative_prompt")

    def _validate_experts(self, params: Any) -> None:
        if params.boundary_ratio is not None and not self.has_two_experts:
            raise InvalidParameterError(
                f"boundary_ratio only applies to two-expert models (Wan2.2 A14B with transformer_2); "
                f"this {self.pipeline_class_name} has one transformer", param="boundary_ratio")
        if params.guidance_scale_2 is not None and params.boundary_ratio is None:
            raise InvalidParameterError(
                "guidance_scale_2 is the low-noise expert's guidance: it needs a two-expert model with a "
                "boundary_ratio", param="guidance_scale_2")
        if params.guidance_scale_2 is not None and params.guidance_scale_2 > 1 and params.guidance_scale <= 1:
            # diffusers switches guidance on or off for both experts from guidance_scale alone
            raise InvalidParameterError(
                f"guidance_scale_2={params.guidance_scale_2} needs guidance_scale > 1 (got "
                f"{params.guidance_scale}): classifier-free guidance is on for both experts or for neither",
                param="guidance_scale_2")

    @staticmethod
    def uses_guidance(request: Request) -> bool:
        return request.params.guidance_scale > 1

    # ------------------------------------------------------------------ generation

    def encode_request(self, request: Request) -> dict[str, torch.Tensor]:
        p = request.params
        embeds, neg_embeds = self.pipeline.encode_prompt(
            prompt=[request.prompt], negative_prompt=p.negative_prompt,
            do_classifier_free_guidance=self.uses_guidance(request), num_videos_per_prompt=1,
            max_sequence_length=p.max_sequence_length, device=self.device)
        encoded = {"prompt_embeds": embeds.to(self.dtype)}
        if self.uses_guidance(request):
            encoded["neg_prompt_embeds"] = neg_embeds.to(self.dtype)
        return encoded

    def initial_latents(self, request: Request) -> tuple[torch.Tensor, dict[str, Any]]:
        """The request's noise (from its own generator), and what else conditions it (nothing for text-to-video)."""
        pipe, p = self.pipeline, request.params
        channels = self._any_transformer().config.in_channels
        latents = pipe.prepare_latents(request.num_outputs, channels, p.height, p.width, p.num_frames,
                                       torch.float32, self.device, request_generator(request))
        return latents, {}

    def prepare(self, request: Request, embeddings: dict[str, torch.Tensor]) -> RequestState:
        pipe, p = self.pipeline, request.params
        latents, extras = self.initial_latents(request)
        scheduler = fresh_scheduler(pipe, p.flow_shift)
        scheduler.set_timesteps(p.num_inference_steps, device=self.device)
        scheduler.set_begin_index(0)
        boundary = None
        if p.boundary_ratio is not None:
            boundary = p.boundary_ratio * scheduler.config.num_train_timesteps
        return RequestState(request=request, latents=latents, scheduler=scheduler, timesteps=scheduler.timesteps,
                            conditioning={**embeddings, **extras, "boundary_timestep": boundary})

    def _expert(self, state: RequestState) -> tuple[str, float]:
        """Which transformer denoises the request at its current step, and with which guidance scale."""
        p, boundary = state.params, state.conditioning["boundary_timestep"]
        if boundary is None or state.t >= boundary:
            return "transformer", p.guidance_scale
        scale_2 = p.guidance_scale_2 if p.guidance_scale_2 is not None else p.guidance_scale
        return "transformer_2", scale_2

    def timestep_input(self, batch: StepBatch, states: Sequence[RequestState], latents: torch.Tensor,
                       patch_size: Sequence[int]) -> torch.Tensor:
        """The transformer's timestep for these requests' rows: one per row, or one per latent token (TI2V)."""
        timesteps = batch.timesteps(states)
        if not self.pipeline.config.expand_timesteps:
            return timesteps
        # one timestep per latent token (frames x patched height x patched width), as Wan2.2 TI2V does
        frames, height, width = latents.shape[2:]
        tokens = frames * math.ceil(height / patch_size[1]) * math.ceil(width / patch_size[2])
        return timesteps[:, None].expand(-1, tokens)

    def model_input(self, batch: StepBatch, states: Sequence[RequestState]) -> torch.Tensor:
        """What the transformer reads for these requests' rows: their noisy latents (text-to-video)."""
        return batch.latents(states)

    def _call_branch(self, batch: StepBatch, branch: str, name: str, states: Sequence[RequestState]) -> torch.Tensor:
        transformer = getattr(self.pipeline, name)
        key = "prompt_embeds" if branch == "cond" else "neg_prompt_embeds"
        text = batch.remember(branch, states, lambda: stack_rows([s.conditioning[key] for s in states], states))
        latents = self.model_input(batch, states)
        return batch.call(branch, states, name, hidden_states=latents.to(transformer.dtype),
                          timestep=self.timestep_input(batch, states, latents, transformer.config.patch_size),
                          encoder_hidden_states=text)

    def _predict_expert(self, batch: StepBatch, name: str, states: list[RequestState]) -> torch.Tensor:
        return self.guided_prediction(batch, lambda branch, rows: self._call_branch(batch, branch, name, rows),
                                      lambda c, u, s: u + self._expert(s)[1] * (c - u), states)

    def predict(self, batch: StepBatch) -> torch.Tensor:
        # requests past the boundary are denoised by the low-noise expert: one group (and call) per expert
        groups: dict[str, list[RequestState]] = {}
        for state in batch.states:
            groups.setdefault(self._expert(state)[0], []).append(state)
        if len(groups) == 1:
            (name, states), = groups.items()
            return self._predict_expert(batch, name, states)
        rows: dict[str, torch.Tensor] = {}
        for name, states in groups.items():
            output = self._predict_expert(batch, name, states)
            for state, part in zip(states, output.split([s.num_rows for s in states]), strict=True):
                rows[state.request_id] = part
        return torch.cat([rows[state.request_id] for state in batch.states])

    def final_latents(self, state: RequestState) -> torch.Tensor:
        """What the VAE decodes of a finished request: its latents (text-to-video)."""
        return state.latents

    def decode(self, state: RequestState) -> RequestMedia:
        vae = self.pipeline.vae
        latents = self.final_latents(state).to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        decoded = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
        videos = self.pipeline.video_processor.postprocess_video(decoded, output_type="np")
        return [to_uint8_video(v) for v in videos]

