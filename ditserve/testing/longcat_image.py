"""Tiny random LongCat-Image pipelines, built locally: LongCatImagePipeline (LongCat-Image) and
LongCatImageEditPipeline (LongCat-Image-Edit).

Both pipelines hard-code 16 latent channels and a 512-token text slot, so the tiny VAE has 16 latent channels
and the transformer reads 64 packed channels. The edit pipeline resizes its input image to about 1024x1024
pixels whatever we ask (diffusers' fixed area), so its VAE compresses 32x to keep the image at 14x18 patches;
the text-to-image VAE compresses 4x so a 64x64 image still has 8x8 patches.

Their ``text_processor`` (a Qwen2VLProcessor) cannot be built where torchvision is missing: the pipeline is
saved without it and its folder written by hand, with a chat template (the text-to-image pipeline rewrites
prompts through ``apply_chat_template``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ditserve.models.qwen_image.processor import load_processor_without_video
from ditserve.testing.common import declare_processor, sensitize
from ditserve.testing.qwen_text import tiny_qwen25_vl_encoder, tiny_qwen_tokenizer, write_processor_folder

#: latent channels both LongCat pipelines hard-code
LATENT_CHANNELS = 16
#: the text encoder's hidden size, which the transformer's context embedder reads
TEXT_HIDDEN = 32
#: Qwen2.5-VL's chat layout (a default system turn, then each message in its own im_start/im_end block), which
#: the text-to-image pipeline's prompt rewriting renders its request with
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tiny_vae(block_out_channels: tuple[int, ...]):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS, block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels), layers_per_block=1, norm_num_groups=4,
        sample_size=32, scaling_factor=1.5, shift_factor=0.1, use_quant_conv=False,
        use_post_quant_conv=False).eval()


def _tiny_transformer():
    from diffusers import LongCatImageTransformer2DModel

    transformer = LongCatImageTransformer2DModel(
        patch_size=1, in_channels=LATENT_CHANNELS * 4, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_HIDDEN, pooled_projection_dim=TEXT_HIDDEN,
        axes_dims_rope=(4, 6, 6)).eval()
    sensitize(transformer)
    return transformer


def _tiny_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # FLUX-style dynamic shifting, rescaled to tiny sequences
    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=1024,
                                           base_shift=0.5, max_shift=1.15)


def _build(path: Path, pipeline_class_name: str, seed: int) -> Path:
    import diffusers

    torch.manual_seed(seed)
    is_edit = pipeline_class_name == "LongCatImageEditPipeline"
    # edit inputs are encoded at ~1024x1024 whatever the output size: compress 32x, with few channels at the
    # full-resolution levels (they dominate a CPU's time)
    vae = _tiny_vae((4, 4, 8, 8, 8, 16) if is_edit else (8, 16, 16))
    tokenizer = tiny_qwen_tokenizer()
    folder = path / "text_processor"
    write_processor_folder(folder, tokenizer)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    # the edit pipeline reads the processor's image part when it is built: build it with the image-only one,
    # then save it without (diffusers would record our class) and name the real class in model_index.json
    pipeline = getattr(diffusers, pipeline_class_name)(
        scheduler=_tiny_scheduler(), vae=vae, text_encoder=tiny_qwen25_vl_encoder(tokenizer, TEXT_HIDDEN),
        tokenizer=tokenizer, text_processor=load_processor_without_video(folder), transformer=_tiny_transformer())
    pipeline.register_modules(text_processor=None)
    pipeline.save_pretrained(path)
    declare_processor(path, "text_processor")
    return path


def build_tiny_longcat_image(path: Path) -> Path:
    return _build(path, "LongCatImagePipeline", seed=0)


def build_tiny_longcat_image_edit(path: Path) -> Path:
    return _build(path, "LongCatImageEditPipeline", seed=1)
