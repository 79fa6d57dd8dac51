"""Pipelines for the generic path (diffusers' own ``__call__``): a tiny random Ovis-Image pipeline
(OvisImagePipeline, no ditserve family adapter), and a minimal in-memory pipeline with no step callback and
layered outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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



def stepless_pipeline(seed: int = 0) -> Any:
    """A minimal diffusers pipeline whose ``__call__`` has no ``callback_on_step_end`` (as LongCat-Image's) and
    returns a list of ``layers`` images per output (as Qwen-Image-Layered's): the generic path's hard cases,
    without the cost of those models' tiny pipelines. Built in memory: diffusers cannot load a class of ours
    from a folder, so tests hand it to the runner directly."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
    from PIL import Image

    class TinyDenoiser(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, channels: int = 3) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(channels + 1, channels)

        def forward(self, latents: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
            pixels = latents.permute(0, 2, 3, 1)
            inputs = torch.cat([pixels, condition.expand(*pixels.shape[:-1], 1)], dim=-1)
            return self.proj(inputs).permute(0, 3, 1, 2)

    class SteplessLayeredPipeline(DiffusionPipeline):
        def __init__(self, transformer: TinyDenoiser, scheduler: FlowMatchEulerDiscreteScheduler) -> None:
            super().__init__()
            self.register_modules(transformer=transformer, scheduler=scheduler)

        @torch.no_grad()
        def __call__(self, prompt: str, num_inference_steps: int = 4, height: int = 16, width: int = 16,
                     layers: int = 2, generator: torch.Generator | None = None) -> ImagePipelineOutput:
            # the prompt's characters condition every pixel: a wrong prompt changes the image
            condition = torch.tensor([sum(map(ord, prompt)) % 97 / 97.0])
            latents = torch.randn(layers, 3, height, width, generator=generator)
            self.scheduler.set_timesteps(num_inference_steps)
            for t in self.scheduler.timesteps:
                latents = self.scheduler.step(self.transformer(latents, condition), t, latents).prev_sample
            pixels = ((latents.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            return ImagePipelineOutput(images=[[Image.fromarray(layer) for layer in pixels]])

    torch.manual_seed(seed)
    return SteplessLayeredPipeline(TinyDenoiser().eval(), FlowMatchEulerDiscreteScheduler())
