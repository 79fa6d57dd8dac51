"""Qwen-Image, -2512, -Edit, -Edit-2509 and -Layered: what this family declares (see ``ditserve.models.family``)."""

from ditserve.models.family import ModelFamily

FAMILY = ModelFamily(
    name="qwen_image",
    adapters={
        "QwenImagePipeline": "ditserve.models.qwen_image.adapter:QwenImageAdapter",
        "QwenImageEditPipeline": "ditserve.models.qwen_image.edit:QwenImageEditAdapter",
        "QwenImageEditPlusPipeline": "ditserve.models.qwen_image.edit:QwenImageEditPlusAdapter",
        "QwenImageLayeredPipeline": "ditserve.models.qwen_image.layered:QwenImageLayeredAdapter",
    },
    cache_specs={
        "QwenImageTransformer2DModel": "ditserve.models.qwen_image.cache_spec",
    },
    parallel_plans={
        "QwenImagePipeline": "ditserve.parallel.families.qwen_image:QwenImagePlan",
        "QwenImageEditPipeline": "ditserve.parallel.families.qwen_image:QwenImagePlan",
        "QwenImageEditPlusPipeline": "ditserve.parallel.families.qwen_image:QwenImagePlan",
        "QwenImageLayeredPipeline": "ditserve.parallel.families.qwen_image:QwenImagePlan",
    },
    tiny_pipelines={
        "qwen_image": "ditserve.testing.qwen_image:build_tiny_qwen_image",
        "qwen_image_edit": "ditserve.testing.qwen_image:build_tiny_qwen_image_edit",
        "qwen_image_edit_plus": "ditserve.testing.qwen_image:build_tiny_qwen_image_edit_plus",
        "qwen_image_layered": "ditserve.testing.qwen_image:build_tiny_qwen_image_layered",
    },
)
