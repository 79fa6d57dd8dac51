"""Z-Image: what this family declares (see ``ditserve.models.family``)."""

from ditserve.models.family import ModelFamily

FAMILY = ModelFamily(
    name="z_image",
    adapters={
        "ZImagePipeline": "ditserve.models.z_image.adapter:ZImageAdapter",
    },
    cache_specs={
        "ZImageTransformer2DModel": "ditserve.models.z_image.cache_spec",
    },
    parallel_plans={},
    tiny_pipelines={
        "z_image": "ditserve.testing.z_image:build_tiny_z_image",
    },
)
