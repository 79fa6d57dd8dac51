"""``model_index.json`` ``_class_name`` -> family adapter. Adding a family is one line here.

Entries are "module:Class" strings so that importing the registry does not import every family.
"""

from __future__ import annotations

from ditserve.lazy import load_object
from ditserve.models.base import ModelAdapter

ADAPTERS: dict[str, str] = {
    "FluxPipeline": "ditserve.models.flux:FluxAdapter",
    "StableDiffusion3Pipeline": "ditserve.models.sd3:StableDiffusion3Adapter",
    "ZImagePipeline": "ditserve.models.z_image:ZImageAdapter",
    "WanPipeline": "ditserve.models.wan:WanAdapter",
    "QwenImagePipeline": "ditserve.models.qwen_image:QwenImageAdapter",
    "QwenImageEditPipeline": "ditserve.models.qwen_image:QwenImageEditAdapter",
    "QwenImageEditPlusPipeline": "ditserve.models.qwen_image:QwenImageEditPlusAdapter",
}


def supported_pipelines() -> list[str]:
    return sorted(ADAPTERS)


def adapter_class_for(pipeline_class_name: str) -> type[ModelAdapter]:
    """The family adapter for a pipeline class, or the generic adapter that runs diffusers' ``__call__``."""
    target = ADAPTERS.get(pipeline_class_name)
    if target is None:
        from ditserve.models.generic import GenericAdapter

        return GenericAdapter
    return load_object(target)
