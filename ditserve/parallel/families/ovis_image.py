"""CFG-parallel for Ovis-Image (OvisImageTransformer2DModel): the conditional and unconditional passes of a step on
two ranks. The transformer returns one ``proj_out`` row per packed latent token, which is all CFG-parallel needs
to know. Sequence and tensor parallelism have no plan for it yet and are refused at start-up."""

from __future__ import annotations

from typing import Any

import torch

from ditserve.parallel.families.base import FamilyPlan, token_output_shape


class OvisImagePlan(FamilyPlan):
    pipeline_class_names = ("OvisImagePipeline",)

    def output_shape(self, transformer: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[int, ...]:
        return token_output_shape(transformer, kwargs)
