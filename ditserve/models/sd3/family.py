"""Stable Diffusion 3 / 3.5: what this family declares (see ``ditserve.models.family``)."""

from ditserve.models.family import ModelFamily

FAMILY = ModelFamily(
    name="sd3",
    adapters={
        "StableDiffusion3Pipeline": "ditserve.models.sd3.adapter:StableDiffusion3Adapter",
    },
    cache_specs={
        "SD3Transformer2DModel": "ditserve.models.sd3.cache_spec",
    },
    parallel_plans={
        "StableDiffusion3Pipeline": "ditserve.parallel.families.sd3:StableDiffusion3Plan",
    },
    tiny_pipelines={
        "sd3": "ditserve.testing.sd3:build_tiny_sd3",
    },
)
