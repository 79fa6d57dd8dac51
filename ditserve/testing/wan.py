"""Tiny random Wan2.x pipelines (WanPipeline, WanImageToVideoPipeline), built locally.

``build_tiny_wan``: one transformer (the Wan2.1 / Wan2.2-5B layout). ``build_tiny_wan_a14b``: the Wan2.2 A14B
layout, two experts (``transformer`` for high noise, ``transformer_2`` for low noise) switched at
``boundary_ratio``. ``build_tiny_wan_i2v_a14b``: Wan2.2 I2V-A14B, the same two experts reading the noisy latents
concatenated with the first-frame condition (4 mask + 16 latent channels) and no image encoder.
``build_tiny_wan_ti2v_i2v``: Wan2.2 TI2V-5B's image-to-video mode, with its 48-channel VAE (16x in space). All use a
UMT5 encoder, a 3-level causal video VAE (4x in time) and UniPC with flow sigmas, as the real models do.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.testing.common import sensitize, tiny_t5_tokenizer

#: where the tiny A14B switches experts: with 4 steps and flow_shift 3, two steps fall on each side
TINY_BOUNDARY_RATIO = 0.9


#: Wan2.2 I2V-A14B's transformers read the noisy latents, then the condition's frame mask (one channel per frame
#: the VAE folds into a latent frame) and the first frame's latents
I2V_MASK_CHANNELS = 4


def _tiny_wan_transformer(in_channels: int, out_channels: int):
    from diffusers import WanTransformer3DModel

    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=in_channels,
        out_channels=out_channels, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64).eval()
    sensitize(transformer)
    return transformer


def _tiny_vae(wan22: bool):
    """Wan2.1's VAE (16 channels, 8x in space), or Wan2.2 TI2V-5B's (48 channels, 16x: 2x2 pixel patches first)."""
    from diffusers import AutoencoderKLWan

    if wan22:
        return AutoencoderKLWan(base_dim=4, decoder_base_dim=4, z_dim=48, in_channels=12, out_channels=12,
                                is_residual=True, patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 48,
                                latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                temperal_downsample=[False, True, True]).eval()
    return AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def _build(path: Path, seed: int, two_experts: bool, expand_timesteps: bool = False,
           image_to_video: bool = False, wan22_vae: bool = False) -> Path:
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    pipeline_class = WanImageToVideoPipeline if image_to_video else WanPipeline
    tokenizer = tiny_t5_tokenizer(max_length=64)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    vae = _tiny_vae(wan22_vae)
    latent = vae.config.z_dim
    # TI2V (expand_timesteps) writes the first frame into the latents themselves; A14B concatenates the condition
    in_channels = latent + I2V_MASK_CHANNELS + latent if image_to_video and not expand_timesteps else latent
    pipeline = pipeline_class(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                          flow_shift=3.0),
        transformer=_tiny_wan_transformer(in_channels, latent),
        transformer_2=_tiny_wan_transformer(in_channels, latent) if two_experts else None,
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


def build_tiny_wan_ti2v_i2v(path: Path, seed: int = 0) -> Path:
    """Wan2.2 TI2V-5B with an input image: the 48-channel VAE, one timestep per latent token, and the first latent
    frame held at the input image's latents (timestep 0)."""
    return _build(path, seed, two_experts=False, expand_timesteps=True, image_to_video=True, wan22_vae=True)
