"""Tiny random FLUX.1 pipelines (FluxPipeline, FluxKontextPipeline), built locally: 2 double + 2 single blocks,
64-dim."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ditserve.testing.common import (
    sensitize,
    tiny_clip_tokenizer,
    tiny_image_vae,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
)

#: the tiny Kontext's sizing (``ditserve_defaults.json``): 64x64 outputs and inputs at their own size, where
#: diffusers' defaults would make every request a megapixel one
TINY_KONTEXT_SIZING = {"max_area": 64 * 64, "auto_resize": False}


def build_tiny_flux(path: Path, guidance_embeds: bool = False, seed: int = 0, kontext: bool = False) -> Path:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    clip_tokenizer = tiny_clip_tokenizer()
    t5_tokenizer = tiny_t5_tokenizer(max_length=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    text_encoder_2 = tiny_t5_encoder(t5_tokenizer)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6)).eval()
    sensitize(transformer)
    vae = tiny_image_vae()
    pipeline_class = FluxKontextPipeline if kontext else FluxPipeline
    pipeline = pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                  max_image_seq_len=256, base_shift=0.5, max_shift=1.15),
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer, transformer=transformer)
    pipeline.save_pretrained(path)
    if kontext:
        (path / "ditserve_defaults.json").write_text(json.dumps({"sampling_defaults": TINY_KONTEXT_SIZING}))
    return path


def build_tiny_flux_dev(path: Path) -> Path:
    """FLUX.1-dev layout: guidance embedded in the transformer (``guidance_scale``, no second pass)."""
    return build_tiny_flux(path, guidance_embeds=True, seed=1)


def build_tiny_flux_kontext(path: Path) -> Path:
    """FLUX.1-Kontext-dev layout: embedded guidance, and the input image's tokens read after the noisy ones."""
    return build_tiny_flux(path, guidance_embeds=True, seed=2, kontext=True)
