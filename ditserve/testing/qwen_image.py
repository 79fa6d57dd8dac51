"""Tiny random Qwen-Image pipelines, built locally: QwenImagePipeline (Qwen-Image, Qwen-Image-2512),
QwenImageEditPipeline (Qwen-Image-Edit), QwenImageEditPlusPipeline (Qwen-Image-Edit-2509) and
QwenImageLayeredPipeline (Qwen-Image-Layered).

The edit pipelines resize their input image to about 1024x1024 pixels whatever the output size (diffusers
hard-codes that area), and Layered to 640x640 or 1024x1024 (its only resolutions), so their VAE compresses 16x
(4 down stages) to keep the condition at 32x32 latent patches or fewer; the text-to-image VAE compresses 4x so a
64x64 image still has 8x8 patches. Layered's VAE reads and writes RGBA (4 channels), and its transformer has the
layer-aware RoPE and the extra timestep condition of the real one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.testing.common import declare_processor, sensitize
from ditserve.testing.qwen_text import tiny_qwen25_vl_encoder, tiny_qwen_tokenizer, write_processor_folder

#: latent channels of the tiny VAE (the real one has 16)
Z_DIM = 4
#: Layered's: the pipeline takes an input with as many channels as the latents for latents, so its 4-channel (RGBA)
#: images need another count
LAYERED_Z_DIM = 8
#: the text encoder's hidden size, which the transformer's joint attention reads
TEXT_HIDDEN = 32
# non-trivial latent statistics, so a missing (de)normalisation step shows up in parity tests
LATENTS_MEAN = [0.1, -0.2, 0.3, 0.0, -0.1, 0.2, -0.3, 0.05]
LATENTS_STD = [1.5, 0.8, 1.2, 2.0, 0.9, 1.1, 1.7, 0.6]


def _tiny_vae(down_stages: int, res_blocks: int, base_dim: int, image_channels: int = 3, z_dim: int = Z_DIM):
    from diffusers import AutoencoderKLQwenImage

    return AutoencoderKLQwenImage(
        base_dim=base_dim, z_dim=z_dim, dim_mult=[1] * (down_stages + 1), num_res_blocks=res_blocks,
        temperal_downsample=[False] * down_stages, input_channels=image_channels, latents_mean=LATENTS_MEAN[:z_dim],
        latents_std=LATENTS_STD[:z_dim]).eval()


def _tiny_transformer(layered: bool = False):
    from diffusers import QwenImageTransformer2DModel

    z_dim = LAYERED_Z_DIM if layered else Z_DIM
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=z_dim * 4, out_channels=z_dim, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=TEXT_HIDDEN, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6), use_additional_t_cond=layered, use_layer3d_rope=layered).eval()
    # a stronger Linear scale than other families: at 2x a changed prompt or step count moves Qwen outputs by
    # only about 11/255; at 3x by 15-23/255
    sensitize(transformer, linear_scale=3.0)
    return transformer


def _tiny_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Qwen-Image's scheduler settings (dynamic exponential shift, terminal shift), rescaled to tiny sequences
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=1024, base_shift=0.5, max_shift=0.9,
        shift_terminal=0.02, time_shift_type="exponential")


def _build(path: Path, pipeline_class_name: str, seed: int) -> Path:
    import diffusers

    torch.manual_seed(seed)
    is_edit = pipeline_class_name != "QwenImagePipeline"
    layered = pipeline_class_name == "QwenImageLayeredPipeline"
    # edit inputs are encoded at ~1024x1024 whatever the output size: compress more, and skip the VAE's
    # residual blocks (at full resolution they cost seconds on a CPU)
    vae = (_tiny_vae(down_stages=4, res_blocks=0, base_dim=4, image_channels=4 if layered else 3,
                     z_dim=LAYERED_Z_DIM if layered else Z_DIM) if is_edit
           else _tiny_vae(down_stages=2, res_blocks=1, base_dim=8))
    tokenizer = tiny_qwen_tokenizer()
    components = {"scheduler": _tiny_scheduler(), "vae": vae,
                  "text_encoder": tiny_qwen25_vl_encoder(tokenizer, TEXT_HIDDEN), "tokenizer": tokenizer,
                  "transformer": _tiny_transformer(layered)}
    if is_edit:
        # transformers cannot build a Qwen2VLProcessor here (its video part needs torchvision): save the pipeline
        # without it, then write the processor's folder and its model_index.json entry by hand
        components["processor"] = None
    pipeline = getattr(diffusers, pipeline_class_name)(**components)
    pipeline.save_pretrained(path)
    if is_edit:
        write_processor_folder(path / "processor", tokenizer)
        declare_processor(path, "processor")
    return path


def build_tiny_qwen_image(path: Path) -> Path:
    return _build(path, "QwenImagePipeline", seed=0)


def build_tiny_qwen_image_edit(path: Path) -> Path:
    return _build(path, "QwenImageEditPipeline", seed=1)


def build_tiny_qwen_image_edit_plus(path: Path) -> Path:
    return _build(path, "QwenImageEditPlusPipeline", seed=2)


def build_tiny_qwen_image_layered(path: Path) -> Path:
    return _build(path, "QwenImageLayeredPipeline", seed=3)
