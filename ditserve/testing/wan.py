"""Tiny random Wan2.x pipelines (WanPipeline, WanImageToVideoPipeline), built locally.

``build_tiny_wan``: one transformer (the Wan2.1 / Wan2.2-5B layout). ``build_tiny_wan_a14b``: the Wan2.2 A14B
layout, two experts (``transformer`` for high noise, ``transformer_2`` for low noise) switched at
``boundary_ratio``. ``build_tiny_wan_i2v_a14b``: Wan2.2 I2V-A14B, the same two experts reading the noisy latents
concatenated with the first-frame condition (4 mask + 16 latent channels) and no image encoder. All use a UMT5
encoder, a 3-level causal video VAE (4x in time, 8x in space) and UniPC with flow sigmas, as the real models do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.testing.common import sensitize, tiny_t5_tokenizer

#: where the tiny A14B switches experts: with 4 steps and flow_shift 3, two steps fall on each side
TINY_BOUNDARY_RATIO = 0.9


#: latent channels of the tiny VAE
LATENT_CHANNELS = 16
#: what Wan2.2 I2V-A14B's transformers read: the noisy latents, then the condition's frame mask (one channel per
#: frame the VAE folds into a latent frame) and the first frame's latents
I2V_IN_CHANNELS = LATENT_CHANNELS + 4 + LATENT_CHANNELS


def _tiny_wan_transformer(in_channels: int = LATENT_CHANNELS):
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
        out_channels=LATENT_CHANNELS,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64).eval()
    sensitize(transformer)
    return transformer


def _build(path: Path, seed: int, two_experts: bool, expand_timesteps: bool = False,
           image_to_video: bool = False) -> Path:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    pipeline_class = WanImageToVideoPipeline if image_to_video else WanPipeline
    in_channels = I2V_IN_CHANNELS if image_to_video else LATENT_CHANNELS
    tokenizer = tiny_t5_tokenizer(max_length=64)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    vae = AutoencoderKLWan(base_dim=4, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    pipeline = pipeline_class(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=3.0),
        transformer=_tiny_wan_transformer(in_channels),
        transformer_2=_tiny_wan_transformer(in_channels) if two_experts else None,
        boundary_ratio=TINY_BOUNDARY_RATIO if two_experts else None, expand_timesteps=expand_timesteps)
    pipeline.save_pretrained(path)
    return path


def build_tiny_wan(path: Path, seed: int = 0) -> Path:
    return _build(path, seed, two_experts=False)


def build_tiny_wan_a14b(path: Path, seed: int = 0) -> Path:
    return _build(path, seed, two_experts=True)


def build_tiny_wan_ti2v(path: Path, seed: int = 0) -> Path:
    """Wan2.2 TI2V-5B's text-to-video mode: one timestep per latent token (``expand_timesteps``)."""
    return _build(path, seed, two_experts=False, expand_timesteps=True)


def build_tiny_wan_i2v_a14b(path: Path, seed: int = 0) -> Path:
    """Wan2.2 I2V-A14B: two experts, the first frame's VAE latents as the condition, no image encoder."""
    return _build(path, seed, two_experts=True, image_to_video=True)
