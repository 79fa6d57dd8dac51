"""``model_index.json`` ``_class_name`` -> parallel plan of the family. Adding a family is one line."""

from __future__ import annotations

from ditserve.lazy import load_object
from ditserve.parallel.families.base import FamilyPlan

PLANS: dict[str, str] = {
    "FluxPipeline": "ditserve.parallel.families.flux:FluxPlan",
    "QwenImagePipeline": "ditserve.parallel.families.qwen_image:QwenImagePlan",
    "QwenImageEditPipeline": "ditserve.parallel.families.qwen_image:QwenImagePlan",
    "QwenImageEditPlusPipeline": "ditserve.parallel.families.qwen_image:QwenImagePlan",
    "WanPipeline": "ditserve.parallel.families.wan:WanPlan",
    "StableDiffusion3Pipeline": "ditserve.parallel.families.sd3:StableDiffusion3Plan",
}


def parallel_families() -> list[str]:
    return sorted(PLANS)


def plan_for(pipeline_class_name: str) -> FamilyPlan | None:
    target = PLANS.get(pipeline_class_name)
    if target is None:
        return None
    return load_object(target)()
