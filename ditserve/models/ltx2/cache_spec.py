"""What the cache methods need to know about LTX2VideoTransformer3DModel.

One list of blocks, each taking and returning the video stream and the audio stream: a skipped loop adds each
stream's own stored residual (the audio is the spec's extra stream), so TeaCache and MagCache skip both together.
TeaCache compares the first block's video self-attention input: ``norm1(hidden)`` shifted and scaled by the
block's table plus the timestep embedding (per token for image-to-video, where the given frame's timestep is 0).
No published coefficients exist for LTX-2: calibrate (``ditserve calibrate``) or tune the thresholds.
"""

from __future__ import annotations

from typing import Any

import torch

from ditserve.cache.spec import BlockIO, CacheSpec, block_argument, register_cache_spec

AUDIO_VIDEO_IO = BlockIO(hidden_name="hidden_states", hidden_position=0, output_index=0,
                         passthrough_names=(("hidden_states", 0), ("audio_hidden_states", 1)),
                         extra_streams=(("audio_hidden_states", 1, 1),))


def ltx2_modulated_input(block: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    hidden = block_argument(args, kwargs, "hidden_states", 0)
    temb = block_argument(args, kwargs, "temb", 4)
    shift, scale = block.get_mod_params(block.scale_shift_table, temb, hidden.shape[0])[:2]
    return block.norm1(hidden.float()) * (1 + scale.float()) + shift.float()


LTX2_SPEC = register_cache_spec(CacheSpec(
    transformer_class="LTX2VideoTransformer3DModel",
    block_lists=(("transformer_blocks", AUDIO_VIDEO_IO),),
    modulated_input=ltx2_modulated_input,
    cache_dit_refusal=(
        "cache-dit's LTX-2 support replaces the transformer's forward with LTX-2.0's, which takes none of the "
        "inputs diffusers' LTX-2 pipelines pass (sigma, spatio-temporal guidance blocks, modality isolation), and "
        "its generic block patterns would read the text embeddings as the second stream where LTX-2's blocks carry "
        "the audio; use 'tea_cache' or 'mag_cache', which reuse the video's and the audio's residuals"),
))
