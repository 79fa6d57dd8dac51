"""What the cache methods need to know about ZImageTransformer2DModel (Z-Image).

The main loop is ``layers`` over the unified (image + caption) sequence; each layer takes the sequence as its
first argument and returns it. TeaCache compares the first layer's attention input modulated by its adaLN
scale (computed from the noisy-token conditioning when the layer modulates per token).
"""

from __future__ import annotations

from typing import Any

import torch

from ditserve.cache.spec import BlockIO, CacheSpec, block_argument, register_cache_spec

UNIFIED_STREAM_IO = BlockIO(hidden_name="x", hidden_position=0)


def z_image_modulated_input(block: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    x = block_argument(args, kwargs, "x", 0)
    normed = block.attention_norm1(x)
    if not block.modulation:
        return normed
    noise_mask = kwargs.get("noise_mask", args[4] if len(args) > 4 else None)
    if noise_mask is not None:
        conditioning = block_argument(args, kwargs, "adaln_noisy", 5)
    else:
        conditioning = block_argument(args, kwargs, "adaln_input", 3)
    scale_msa = block.adaLN_modulation(conditioning).unsqueeze(1).chunk(4, dim=2)[0]
    return normed * (1.0 + scale_msa)


Z_IMAGE_SPEC = register_cache_spec(CacheSpec(
    transformer_class="ZImageTransformer2DModel",
    block_lists=(("layers", UNIFIED_STREAM_IO),),
    modulated_input=z_image_modulated_input,
    # no verified published fit: TeaCache uses the raw change until 'ditserve calibrate' fits one
))
