"""A tiny random Ovis-Image pipeline (OvisImagePipeline), built locally: Qwen3 text encoder, FLUX-layout DiT."""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.testing.common import sensitize, tiny_image_vae
from ditserve.testing.z_image import tiny_qwen3_encoder, tiny_qwen_tokenizer


def build_tiny_ovis_image(path: Path, seed: int = 0) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, OvisImagePipeline, OvisImageTransformer2DModel

    torch.manual_seed(seed)
    tokenizer = tiny_qwen_tokenizer()
    # FLUX-like packing: 4 latent channels x 2x2 patches = 16 input channels
    transformer = OvisImageTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)).eval()
    sensitize(transformer)
    pipeline = OvisImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16,
                                                  max_image_seq_len=256, base_shift=0.5, max_shift=1.15),
        vae=tiny_image_vae(), text_encoder=tiny_qwen3_encoder(tokenizer), tokenizer=tokenizer,
        transformer=transformer)
    pipeline.save_pretrained(path)
    return path
