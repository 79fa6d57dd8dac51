"""What the cache methods need to know about WanTransformer3DModel (Wan2.1 / Wan2.2, both A14B experts).

One list of blocks taking and returning the video token stream. TeaCache compares the first block's
self-attention input: ``norm1(hidden)`` shifted and scaled by the block's table plus the timestep projection
(per token for Wan2.2 TI2V, where ``temb`` has a sequence axis).
"""

from __future__ import annotations

from typing import Any

import torch

from ditserve.cache.spec import BlockIO, CacheSpec, block_argument, register_cache_spec

VIDEO_STREAM_IO = BlockIO(hidden_name="hidden_states", hidden_position=0)


def wan_modulated_input(block: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    hidden = block_argument(args, kwargs, "hidden_states", 0)
    temb = block_argument(args, kwargs, "temb", 2)
    if temb.ndim == 4:
        shift, scale = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)[:2]
        shift, scale = shift.squeeze(2), scale.squeeze(2)
    else:
        shift, scale = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    return block.norm1(hidden.float()) * (1 + scale) + shift


WAN_SPEC = register_cache_spec(CacheSpec(
    transformer_class="WanTransformer3DModel",
    block_lists=(("blocks", VIDEO_STREAM_IO),),
    modulated_input=wan_modulated_input,
    # the published TeaCache/MagCache values are for Wan2.1 checkpoints, not Wan2.2: calibrate instead
))
