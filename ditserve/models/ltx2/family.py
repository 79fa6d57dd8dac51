"""LTX-2 text-to-video and image-to-video, each with its sound track: what this family declares (see
``ditserve.models.family``).

No parallel plan: each step runs up to four transformer passes (conditional, unconditional, spatio-temporal and
modality guidance) of a transformer with two output streams, while CFG-parallel shares two single-stream passes
between two ranks; Ulysses and ring have no plan for its joint video-audio attention either.
"""

from ditserve.models.family import ModelFamily

FAMILY = ModelFamily(
    name="ltx2",
    adapters={
        "LTX2Pipeline": "ditserve.models.ltx2.adapter:LTX2Adapter",
        "LTX2ImageToVideoPipeline": "ditserve.models.ltx2.image_to_video:LTX2ImageToVideoAdapter",
    },
    cache_specs={
        "LTX2VideoTransformer3DModel": "ditserve.models.ltx2.cache_spec",
    },
    tiny_pipelines={
        "ltx2": "ditserve.testing.ltx2:build_tiny_ltx2",
        "ltx2_stg": "ditserve.testing.ltx2:build_tiny_ltx2_stg",
        "ltx2_i2v": "ditserve.testing.ltx2:build_tiny_ltx2_i2v",
    },
)
