"""What the cache methods need to know about SD3Transformer2DModel (Stable Diffusion 3 and 3.5).

One list of MMDiT blocks (``JointTransformerBlock``) taking (hidden_states, encoder_hidden_states, temb) and
returning (encoder_hidden_states, hidden_states), as FLUX's dual-stream blocks do. The last block only updates
the image stream (``context_pre_only``) and returns ``None`` for the text stream, which nothing reads after the
loop. TeaCache compares the first block's modulated image input, ``norm1(hidden_states, emb=temb)``: the input
of its attention (SD3.5's dual-attention blocks return it first, as the plain AdaLayerNormZero does).
"""

from __future__ import annotations

from typing import Any

import torch

from ditserve.cache.spec import DUAL_STREAM_IO, CacheSpec, block_argument, register_cache_spec


def sd3_modulated_input(block: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    hidden = block_argument(args, kwargs, "hidden_states", 0)
    temb = block_argument(args, kwargs, "temb", 2)
    return block.norm1(hidden, emb=temb)[0]


SD3_SPEC = register_cache_spec(CacheSpec(
    transformer_class="SD3Transformer2DModel",
    block_lists=(("transformer_blocks", DUAL_STREAM_IO),),
    modulated_input=sd3_modulated_input,
    # no published TeaCache fit or MagCache ratios for SD3 / SD3.5 that we could verify: TeaCache uses the raw
    # change and MagCache needs ratios until 'ditserve calibrate' fits them
    # blocks take (hidden, encoder) and return (encoder, hidden), as cache-dit's own SD3 pipeline adapter says
    cache_dit_forward_pattern="Pattern_1",
))
