"""Ovis-Image (generic path: diffusers' own __call__; caches hook its transformer): what this family declares (see ``ditserve.models.family``)."""

from ditserve.models.family import ModelFamily

FAMILY = ModelFamily(
    name="ovis_image",
    adapters={},
    cache_specs={
        "OvisImageTransformer2DModel": "ditserve.models.ovis_image.cache_spec",
    },
    parallel_plans={},
    tiny_pipelines={
        "ovis_image": "ditserve.testing.generic:build_tiny_ovis_image",
    },
)
