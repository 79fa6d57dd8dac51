"""FLUX.1 (FluxPipeline): dual-stream + single-stream MMDiT with packed 2x2 latents, flow matching.

Guidance: FLUX.1-dev embeds ``guidance_scale`` in the transformer (no extra pass); "true" CFG with a negative
prompt and ``true_cfg_scale > 1`` runs a second, unconditional pass, as diffusers' FluxPipeline does.
The bundled demo model is a FLUX-architecture model and uses this adapter. FLUX.1-Kontext (``kontext.py``) is
this adapter with context tokens: the input image's latents, read after the noisy ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

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


@dataclass
class PackedLatents:
    """A request's starting point in 2x2-patch tokens: its noise (one row per output), the position ids of every
    image token the transformer reads (the noise's, then the context's; no batch dimension), and the context
    tokens read after the noise (Kontext: the input image's latents, one row per output; None otherwise)."""

    noise: torch.Tensor
    ids: torch.Tensor
    context: torch.Tensor | None = None


class FluxAdapter(LoopAdapter):
    pipeline_class_names = ("FluxPipeline",)
    unsupported_params = ("guidance_scale_2", "boundary_ratio", "fps")
    guidance_note = "embedded in the transformer; true_cfg_scale > 1 with a negative_prompt runs true CFG"
    #: FluxPipeline lets a scheduler configured with ``use_flow_sigmas`` compute its own sigmas; pipelines that
    #: always pass their linear sigmas (FluxKontextPipeline) say False
    schedulers_may_choose_sigmas: ClassVar[bool] = True
    #: the longest text diffusers' pipeline accepts
    max_sequence_length_limit: ClassVar[int] = 512

    def family_defaults(self) -> dict[str, Any]:
        size = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return {"num_inference_steps": 28, "guidance_scale": 3.5, "true_cfg_scale": 1.0,
                "max_sequence_length": 512, "height": size, "width": size}

    def validate_params(self, params: Any) -> None:
        super().validate_params(params)
        from ditserve.errors import InvalidParameterError

        limit = self.max_sequence_length_limit
        if params.max_sequence_length is not None and params.max_sequence_length > limit:
            raise InvalidParameterError(
                f"max_sequence_length={params.max_sequence_length} must be <= {limit} for {self.pipeline_class_name}",
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

    @property
    def latent_channels(self) -> int:
        """Channels of the unpacked latents (the transformer reads four of them per 2x2 patch)."""
        return self.pipeline.transformer.config.in_channels // 4

    def request_latents(self, request: Request, dtype: torch.dtype) -> PackedLatents:
        """The request's initial noise from its own generator, packed, with the ids of its tokens."""
        p = request.params
        noise, ids = self.pipeline.prepare_latents(request.num_outputs, self.latent_channels, p.height, p.width,
                                                   dtype, self.device, request_generator(request))
        return PackedLatents(noise=noise, ids=ids)

    def prepare(self, request: Request, embeddings: dict[str, Any]) -> RequestState:
        pipe, p = self.pipeline, request.params
        latents = self.request_latents(request, embeddings["prompt_embeds"].dtype)
        scheduler = fresh_scheduler(pipe, p.flow_shift)
        steps = p.num_inference_steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if self.schedulers_may_choose_sigmas and getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        # the shift follows the noisy tokens only: context tokens are not generated
        timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas,
                                          mu=flow_match_shift(pipe, latents.noise.shape[1]))
        scheduler.set_begin_index(0)
        conditioning = {**embeddings, "image_ids": latents.ids, "context": latents.context,
                        "guidance": self.embedded_guidance(request)}
        return RequestState(request=request, latents=latents.noise, scheduler=scheduler, timesteps=timesteps,
                            conditioning=conditioning)

    def embedded_guidance(self, request: Request) -> torch.Tensor | None:
        """The guidance scale the transformer embeds (FLUX.1-dev), one per output row; None for models without."""
        if not self.pipeline.transformer.config.guidance_embeds:
            return None
        return torch.full([request.num_outputs], request.params.guidance_scale, device=self.device,
                          dtype=torch.float32)

    def _branch_inputs(self, batch: StepBatch, branch: str, states: Sequence[RequestState]) -> dict[str, Any]:
        """The text inputs of one guidance branch for ``states``, and their context tokens, stacked once while
        the batch's members stay."""
        prefix = "" if branch == "cond" else "neg_"

        def stack() -> dict[str, Any]:
            embeddings = [s.conditioning for s in states]
            guidance = [e["guidance"] for e in embeddings]
            context = [e["context"] for e in embeddings]
            return {"encoder_hidden_states": stack_rows([e[f"{prefix}prompt_embeds"] for e in embeddings], states),
                    "pooled_projections": stack_rows([e[f"{prefix}pooled"] for e in embeddings], states),
                    # text ids carry no batch dimension: the same for every row of one max_sequence_length
                    "txt_ids": embeddings[0][f"{prefix}text_ids"],
                    # image ids neither: the step key makes every request of a batch the same token layout
                    "img_ids": embeddings[0]["image_ids"],
                    "guidance": None if guidance[0] is None else torch.cat(guidance),
                    # context rows are already one per output
                    "context": None if context[0] is None else torch.cat(context)}

        return batch.remember(branch, states, stack)

    def _call_branch(self, batch: StepBatch, branch: str, states: Sequence[RequestState]) -> torch.Tensor:
        inputs = dict(self._branch_inputs(batch, branch, states))
        latents = batch.latents(states)
        timestep = batch.timesteps(states).to(latents.dtype) / 1000
        return batch.call_with_context(branch, states, latents, inputs.pop("context"), timestep=timestep,
                                       **inputs)

    def predict(self, batch: StepBatch) -> torch.Tensor:
        return self.guided_prediction(batch, partial(self._call_branch, batch),
                                      lambda c, u, s: u + s.params.true_cfg_scale * (c - u))

    def decode(self, state: RequestState) -> RequestMedia:
        pipe, p = self.pipeline, state.params
        latents = pipe._unpack_latents(state.latents, p.height, p.width, pipe.vae_scale_factor)
        latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        decoded = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(decoded, output_type="pil")
