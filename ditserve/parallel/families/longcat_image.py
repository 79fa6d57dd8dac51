"""CFG-parallel for LongCat-Image and LongCat-Image-Edit (LongCatImageTransformer2DModel): the guidance branches
run on two ranks. No sequence or tensor plan: Ulysses, ring and tensor parallelism are refused at start-up."""

from __future__ import annotations

from typing import Any

import torch

from ditserve.parallel.families.base import FamilyPlan, token_output_shape


class LongCatImagePlan(FamilyPlan):
    pipeline_class_names = ("LongCatImagePipeline", "LongCatImageEditPipeline")

    def output_shape(self, transformer: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[int, ...]:
        # one proj_out row per image token (an edit's input-image tokens included; the adapter drops them)
        return token_output_shape(transformer, kwargs)
