"""LongCat-Image and LongCat-Image-Edit: what this family declares (see ``ditserve.models.family``)."""

from ditserve.models.family import ModelFamily

FAMILY = ModelFamily(
    name="longcat_image",
    adapters={
        "LongCatImagePipeline": "ditserve.models.longcat_image.adapter:LongCatImageAdapter",
        "LongCatImageEditPipeline": "ditserve.models.longcat_image.edit:LongCatImageEditAdapter",
    },
    cache_specs={
        "LongCatImageTransformer2DModel": "ditserve.models.longcat_image.cache_spec",
    },
    parallel_plans={
        "LongCatImagePipeline": "ditserve.parallel.families.longcat_image:LongCatImagePlan",
        "LongCatImageEditPipeline": "ditserve.parallel.families.longcat_image:LongCatImagePlan",
    },
    tiny_pipelines={
        "longcat_image": "ditserve.testing.longcat_image:build_tiny_longcat_image",
        "longcat_image_edit": "ditserve.testing.longcat_image:build_tiny_longcat_image_edit",
    },
)
