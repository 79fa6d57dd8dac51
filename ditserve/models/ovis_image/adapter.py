"""Ovis-Image (OvisImagePipeline): FLUX's transformer layout (dual-stream then single-stream blocks over packed 2x2
latents, RoPE from latent and text ids) conditioned on Qwen3 hidden states, flow matching.

What differs from FLUX: no pooled text embedding and no embedded guidance; classic classifier-free guidance with
``guidance_scale > 1`` (diffusers' default 5.0) against the negative prompt, empty when none is given. Every
prompt is padded to ``max_sequence_length`` tokens by the pipeline itself, so prompts of one batch stack without
a mask. Latents, schedule and decoding are FLUX's, shared through ``FluxAdapter``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, ClassVar

import torch

from ditserve.errors import InvalidParameterError
from ditserve.models.base import RequestState, StepBatch, stack_rows
from ditserve.models.flux.adapter import FluxAdapter
from ditserve.request import Request


class OvisImageAdapter(FluxAdapter):
    pipeline_class_names = ("OvisImagePipeline",)
    unsupported_params = ("true_cfg_scale", "guidance_scale_2", "boundary_ratio", "fps")
    guidance_note = "classifier-free guidance when > 1, against negative_prompt (empty when not given)"
    max_sequence_length_limit: ClassVar[int] = 256

    def family_defaults(self) -> dict[str, Any]:
        size = self.pipeline.default_sample_size * self.pipeline.vae_scale_factor
        return {"num_inference_steps": 50, "guidance_scale": 5.0, "max_sequence_length": 256,
                "height": size, "width": size}

    def validate_params(self, params: Any) -> None:
        super().validate_params(params)
        # diffusers ignores a negative prompt without guidance; an option that would be ignored is an error here
        if params.negative_prompt is not None and params.guidance_scale <= 1:
            raise InvalidParameterError(
                f"negative_prompt is only used with guidance_scale > 1 (got {params.guidance_scale}) for "
                f"{self.pipeline_class_name}", param="negative_prompt")

    @staticmethod
    def uses_guidance(request: Request) -> bool:
        return request.params.guidance_scale > 1

    def encode_request(self, request: Request) -> dict[str, Any]:
        p = request.params
        guided = self.uses_guidance(request)
        embeds, neg_embeds, text_ids, neg_text_ids = self.pipeline.encode_prompt(
            prompt=[request.prompt], negative_prompt=[p.negative_prompt or ""] if guided else None,
            do_classifier_free_guidance=guided, device=self.device, num_images_per_prompt=1,
            max_sequence_length=p.max_sequence_length)
        encoded = {"prompt_embeds": embeds, "text_ids": text_ids}
        if guided:
            encoded |= {"neg_prompt_embeds": neg_embeds, "neg_text_ids": neg_text_ids}
        return encoded

    def embedded_guidance(self, request: Request) -> None:
        # guidance is classic CFG: the transformer embeds none
        return None

    def _branch_inputs(self, batch: StepBatch, branch: str, states: Sequence[RequestState]) -> dict[str, Any]:
        prefix = "" if branch == "cond" else "neg_"

        def stack() -> dict[str, Any]:
            first = states[0].conditioning
            return {"encoder_hidden_states": stack_rows([s.conditioning[f"{prefix}prompt_embeds"] for s in states],
                                                        states),
                    # ids carry no batch dimension; every prompt has max_sequence_length tokens, so they are shared
                    "txt_ids": first[f"{prefix}text_ids"], "img_ids": first["image_ids"],
                    # no context tokens (FLUX.1-Kontext's input image): the noisy latents alone
                    "context": None}

        return batch.remember(branch, states, stack)

    def predict(self, batch: StepBatch) -> torch.Tensor:
        return self.guided_prediction(batch, partial(self._call_branch, batch),
                                      lambda c, u, s: u + s.params.guidance_scale * (c - u))
