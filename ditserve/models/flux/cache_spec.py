"""What the cache methods need to know about FluxTransformer2DModel (FLUX.1 and the demo model).

The loop is the dual-stream blocks then the single-stream blocks; both take (hidden_states,
encoder_hidden_states) and return (encoder_hidden_states, hidden_states) in diffusers 0.42. TeaCache compares
the first dual-stream block's modulated image input, ``norm1(hidden_states, emb=temb)``, as TeaCache4FLUX does.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

from ditserve.cache.spec import DUAL_STREAM_IO, CacheSpec, block_argument, register_cache_spec


def flux_modulated_input(block: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    hidden = block_argument(args, kwargs, "hidden_states", 0)
    temb = block_argument(args, kwargs, "temb", 2)
    return block.norm1(hidden, emb=temb)[0]


FLUX_SPEC = register_cache_spec(CacheSpec(
    transformer_class="FluxTransformer2DModel",
    block_lists=(("transformer_blocks", DUAL_STREAM_IO), ("single_transformer_blocks", DUAL_STREAM_IO)),
    modulated_input=flux_modulated_input,
    tea_coefficients=(4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01),
    tea_coefficients_source="TeaCache4FLUX (ali-vilab/TeaCache), fitted on FLUX.1-dev",
    mag_ratios=tuple(float(r) for r in FLUX_MAG_RATIOS),
    mag_ratios_source="MagCache (Zehong-Ma/MagCache), FLUX.1-dev 28 steps, as shipped in diffusers.hooks.mag_cache",
))
