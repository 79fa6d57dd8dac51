"""A pipeline for the generic path (diffusers' own ``__call__``): a minimal in-memory pipeline with no step callback
and layered outputs."""

from __future__ import annotations

from typing import Any

import torch


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


def generic_runner(pipeline: Any, **config: Any) -> Any:
    """A CPU model runner that serves ``pipeline`` through the generic path (its own ``__call__``) whatever its
    family, with engine options ``config``: the generic path's tests run real pipelines whose family has an
    adapter, and in-memory ones diffusers cannot load from a folder."""
    from ditserve.config import OmniDiffusionConfig
    from ditserve.engine.runner import ModelRunner
    from ditserve.models.generic import GenericAdapter
    from ditserve.models.loader import LoadedModel

    name = type(pipeline).__name__
    loaded = LoadedModel(name=name, path=name, pipeline=pipeline, adapter=GenericAdapter(pipeline),
                         device=torch.device("cpu"), dtype=torch.float32)
    return ModelRunner(OmniDiffusionConfig(model=name, device="cpu", **config), model=loaded)


def generic_engine(pipeline: Any, **config: Any) -> Any:
    """A CPU engine over ``generic_runner(pipeline, **config)``."""
    from ditserve.config import OmniDiffusionConfig
    from ditserve.engine.engine import DiffusionEngine

    name = type(pipeline).__name__
    return DiffusionEngine(OmniDiffusionConfig(model=name, device="cpu", **config),
                           runner=generic_runner(pipeline, **config))
