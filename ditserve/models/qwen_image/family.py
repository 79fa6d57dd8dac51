"""Qwen-Image, -2512, -Edit and -Edit-2509: what this family declares (see ``ditserve.models.family``)."""

from ditserve.models.family import ModelFamily

FAMILY = ModelFamily(
    name="qwen_image",
    adapters={
        "QwenImagePipeline": "ditserve.models.qwen_image.adapter:QwenImageAdapter",
        "QwenImageEditPipeline": "ditserve.models.qwen_image.edit:QwenImageEditAdapter",
        "QwenImageEditPlusPipeline": "ditserve.models.qwen_image.edit:QwenImageEditPlusAdapter",
    },
    cache_specs={
        "QwenImageTransformer2DModel": "ditserve.models.qwen_image.cache_spec",
    },
    parallel_plans={
        "QwenImagePipeline": "ditserve.parallel.families.qwen_image:QwenImagePlan",
        "QwenImageEditPipeline": "ditserve.parallel.families.qwen_image:QwenImagePlan",
        "QwenImageEditPlusPipeline": "ditserve.parallel.families.qwen_image:QwenImagePlan",
    },
    tiny_pipelines={
        "qwen_image": "ditserve.testing.qwen_image:build_tiny_qwen_image",
        "qwen_image_edit": "ditserve.testing.qwen_image:build_tiny_qwen_image_edit",
        "qwen_image_edit_plus": "ditserve.testing.qwen_image:build_tiny_qwen_image_edit_plus",
    },
)
