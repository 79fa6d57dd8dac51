"""FLUX.1, FLUX.1-Kontext and the bundled demo model: what this family declares (see ``ditserve.models.family``)."""

from ditserve.models.family import ModelFamily

FAMILY = ModelFamily(
    name="flux",
    adapters={
        "FluxPipeline": "ditserve.models.flux.adapter:FluxAdapter",
        "FluxKontextPipeline": "ditserve.models.flux.kontext:FluxKontextAdapter",
    },
    cache_specs={
        "FluxTransformer2DModel": "ditserve.models.flux.cache_spec",
    },
    parallel_plans={
        "FluxPipeline": "ditserve.parallel.families.flux:FluxPlan",
        "FluxKontextPipeline": "ditserve.parallel.families.flux:FluxPlan",
    },
    tiny_pipelines={
        "flux": "ditserve.testing.flux:build_tiny_flux",
        "flux_dev": "ditserve.testing.flux:build_tiny_flux_dev",
        "flux_kontext": "ditserve.testing.flux:build_tiny_flux_kontext",
    },
)
