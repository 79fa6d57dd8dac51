"""What the cache methods need to know about QwenImageTransformer2DModel (Qwen-Image, Edit, Edit-2509, 2512).

One list of dual-stream blocks taking (hidden_states, encoder_hidden_states) and returning
(encoder_hidden_states, hidden_states). TeaCache compares the first block's modulated image input: the image
norm modulated by the first half of ``img_mod(temb)``, through the block's own ``_modulate`` (which also
handles the per-token modulation index of the edit models).
"""

from __future__ import annotations

from typing import Any

import torch

from ditserve.cache.spec import DUAL_STREAM_IO, CacheSpec, block_argument, register_cache_spec


def qwen_image_modulated_input(block: torch.nn.Module, args: tuple[Any, ...],
                               kwargs: dict[str, Any]) -> torch.Tensor:
    hidden = block_argument(args, kwargs, "hidden_states", 0)
    temb = block_argument(args, kwargs, "temb", 3)
    first_modulation = block.img_mod(temb).chunk(2, dim=-1)[0]
    return block._modulate(block.img_norm1(hidden), first_modulation, kwargs.get("modulate_index"))[0]


QWEN_IMAGE_SPEC = register_cache_spec(CacheSpec(
    transformer_class="QwenImageTransformer2DModel",
    block_lists=(("transformer_blocks", DUAL_STREAM_IO),),
    modulated_input=qwen_image_modulated_input,
    # no published fit for Qwen-Image that we could verify: TeaCache uses the raw change until
    # 'ditserve calibrate' fits one; MagCache needs calibrated ratios
))
