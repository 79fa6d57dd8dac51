"""A tiny random Stable Diffusion 3.5 pipeline (StableDiffusion3Pipeline), built locally.

Same layout as the real model: two CLIP text encoders with projection (CLIP-L, CLIP-G), a T5 encoder, an
MMDiT transformer with RMS q/k norms and one dual-attention block (the SD3.5 addition), and a small 4-channel VAE.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.testing.common import (
    sensitize,
    tiny_clip_tokenizer,
    tiny_image_vae,
    tiny_t5_encoder,
    tiny_t5_tokenizer,
)


def _clip_encoder(vocab_size: int, hidden_size: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden_size,
        bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()


def build_tiny_sd3(path: Path, seed: int = 0) -> Path:
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    torch.manual_seed(seed)
    clip_tokenizer = tiny_clip_tokenizer()
    t5_tokenizer = tiny_t5_tokenizer(max_length=64)
    # CLIP-L and CLIP-G hidden states are concatenated, then zero-padded to T5's width: 16 + 16 <= 32
    text_encoder = _clip_encoder(len(clip_tokenizer), 16)
    text_encoder_2 = _clip_encoder(len(clip_tokenizer), 16)
    text_encoder_3 = tiny_t5_encoder(t5_tokenizer)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=32,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    sensitize(transformer)
    vae = tiny_image_vae()
    pipeline = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tiny_clip_tokenizer(), text_encoder_3=text_encoder_3, tokenizer_3=t5_tokenizer,
        transformer=transformer)
    pipeline.save_pretrained(path)
    return path
