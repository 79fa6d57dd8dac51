"""Wan2.1 / Wan2.2 text-to-video (A14B two experts, TI2V-5B) and Wan2.2 I2V-A14B image-to-video: what this family declares (see ``ditserve.models.family``)."""

from ditserve.models.family import ModelFamily

FAMILY = ModelFamily(
    name="wan",
    adapters={
        "WanPipeline": "ditserve.models.wan.adapter:WanAdapter",
        "WanImageToVideoPipeline": "ditserve.models.wan.image_to_video:WanImageToVideoAdapter",
    },
    cache_specs={
        "WanTransformer3DModel": "ditserve.models.wan.cache_spec",
    },
    parallel_plans={
        "WanPipeline": "ditserve.parallel.families.wan:WanPlan",
        # the first-frame condition joins the latents before the patch embedding: the token stream is T2V's
        "WanImageToVideoPipeline": "ditserve.parallel.families.wan:WanPlan",
    },
    tiny_pipelines={
        "wan": "ditserve.testing.wan:build_tiny_wan",
        "wan_a14b": "ditserve.testing.wan:build_tiny_wan_a14b",
        "wan_ti2v": "ditserve.testing.wan:build_tiny_wan_ti2v",
        "wan_i2v_a14b": "ditserve.testing.wan:build_tiny_wan_i2v_a14b",
        "wan_ti2v_i2v": "ditserve.testing.wan:build_tiny_wan_ti2v_i2v",
    },
)
