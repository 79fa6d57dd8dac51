"""What the cache methods need to know about OvisImageTransformer2DModel (Ovis-Image).

The same layout as FLUX.1: dual-stream blocks then single-stream blocks, both taking (hidden_states,
encoder_hidden_states) and returning (encoder_hidden_states, hidden_states); the first dual-stream block's
``norm1`` is an AdaLayerNormZero as FLUX's, so TeaCache compares the same modulated image input. The adapter runs
the two guidance passes as two transformer calls per step: the caches keep one state for each.
"""

from __future__ import annotations

from ditserve.cache.spec import DUAL_STREAM_IO, CacheSpec, register_cache_spec
from ditserve.models.flux.cache_spec import flux_modulated_input

OVIS_IMAGE_SPEC = register_cache_spec(CacheSpec(
    transformer_class="OvisImageTransformer2DModel",
    block_lists=(("transformer_blocks", DUAL_STREAM_IO), ("single_transformer_blocks", DUAL_STREAM_IO)),
    modulated_input=flux_modulated_input,
    # no published fit for Ovis-Image: TeaCache uses the raw change and MagCache needs ratios until
    # 'ditserve calibrate' fits them
))
