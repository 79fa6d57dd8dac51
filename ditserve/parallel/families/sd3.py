"""CFG-parallel for Stable Diffusion 3 / 3.5 (SD3Transformer2DModel): the conditional and unconditional passes of
a step on two ranks. The transformer returns a latent image of its input's size with ``out_channels`` channels,
which is all CFG-parallel needs to know. Sequence and tensor parallelism have no plan for SD3 yet and are
refused at start-up."""

from __future__ import annotations

from typing import Any

import torch

from ditserve.parallel.families.base import FamilyPlan


class StableDiffusion3Plan(FamilyPlan):
    pipeline_class_names = ("StableDiffusion3Pipeline",)

    def output_shape(self, transformer: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[int, ...]:
        batch, _, height, width = kwargs["hidden_states"].shape
        return batch, transformer.config.out_channels, height, width
