"""Ovis-Image: what this family declares (see ``ditserve.models.family``)."""

from ditserve.models.family import ModelFamily

FAMILY = ModelFamily(
    name="ovis_image",
    adapters={
        "OvisImagePipeline": "ditserve.models.ovis_image.adapter:OvisImageAdapter",
    },
    cache_specs={
        "OvisImageTransformer2DModel": "ditserve.models.ovis_image.cache_spec",
    },
    parallel_plans={
        "OvisImagePipeline": "ditserve.parallel.families.ovis_image:OvisImagePlan",
    },
    tiny_pipelines={
        "ovis_image": "ditserve.testing.ovis_image:build_tiny_ovis_image",
    },
)
