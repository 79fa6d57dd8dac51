"""Sequence parallelism for Wan2.x text-to-video (WanTransformer3DModel).

Wan patchifies the video inside its forward, so the shard is taken where the token sequence first exists:
the input of the first block (``hidden_states`` dim 1), the rotary tables (``rope`` outputs, dim 1) and, for
models with per-token timesteps (Wan2.2 TI2V), ``timestep`` (dim 1) at the model's input. Self-attention
(``attn1``) runs over every rank's shard; cross-attention (``attn2``) needs no communication: each rank's
queries attend to the full text, which every rank holds. ``proj_out`` is gathered before the unpatchify.

Tensor parallelism: in every block (both transformers of A14B) self- and cross-attention split q/k/v (and an
image-to-video model's added k/v) by heads and ``to_out[0]`` by rows; Wan's q/k RMSNorms span all heads, so
they become all-reduced ``ShardedRMSNorm``s; the feed-forward ``ffn`` splits as usual.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.errors import ParallelConfigError
from ditserve.parallel.families.base import FamilyPlan
from ditserve.parallel.sequence import JointSequence, sequence_parallel_attention
from ditserve.parallel.sharding import gather_output_hook, shard
from ditserve.parallel.tensor import TensorSplit
from ditserve.parallel.topology import ParallelTopology


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary: channel pairs (2i, 2i+1) rotated by the angle whose cos/sin sit at even/odd slots."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).type_as(x)


class WanSelfAttentionProcessor:
    """Wan self-attention (projections, RMS norms over all heads, interleaved rotary as diffusers'
    WanAttnProcessor) computed over the sequence shards of every rank."""

    def __init__(self, topology: ParallelTopology) -> None:
        self.topology = topology

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("the Wan sequence-parallel processor serves self-attention (attn1) only")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query, key = (_rotate_interleaved(x, *rotary_emb) for x in (query, key))
        out = sequence_parallel_attention(JointSequence(query, key, value), self.topology)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class WanPlan(FamilyPlan):
    pipeline_class_names = ("WanPipeline",)

    def output_shape(self, transformer: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[int, ...]:
        hidden = kwargs["hidden_states"]
        channels = transformer.proj_out.out_features // math.prod(transformer.config.patch_size)
        return hidden.shape[0], channels, *hidden.shape[2:]

    def attention_heads(self, transformer: torch.nn.Module) -> int:
        return int(transformer.config.num_attention_heads)

    def sharded_tokens(self, adapter: Any, params: OmniDiffusionSamplingParams) -> int:
        pipe = adapter.pipeline
        p_t, p_h, p_w = pipe.transformer.config.patch_size
        latent_frames = (params.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        rows = params.height // pipe.vae_scale_factor_spatial // p_h
        columns = params.width // pipe.vae_scale_factor_spatial // p_w
        return latent_frames // p_t * rows * columns

    def split_tensor_parallel(self, transformer: torch.nn.Module, split: TensorSplit) -> None:
        for index, block in enumerate(transformer.blocks):
            for attn in (block.attn1, block.attn2):
                added = attn.add_k_proj is not None  # image-to-video: keys/values of the image context
                split.attention(attn, column=("to_q", "to_k", "to_v", *(("add_k_proj", "add_v_proj") if added else ())),
                                row=("to_out.0",),
                                norms_across_heads=("norm_q", "norm_k", *(("norm_added_k",) if added else ())))
            split.feed_forward(block.ffn, f"blocks.{index}.ffn")

    def install(self, transformer: torch.nn.Module, topology: ParallelTopology) -> None:
        def shard_timestep(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
            timestep = kwargs.get("timestep")
            if timestep is not None and timestep.ndim == 2:
                kwargs = {**kwargs, "timestep": shard(timestep, 1, topology, "per-token timestep")}
            return args, kwargs

        def shard_rope(module: torch.nn.Module, args: tuple, output: tuple) -> tuple:
            return tuple(shard(table, 1, topology, "rotary table") for table in output)

        def shard_first_block_input(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
            if not args:
                raise ParallelConfigError("Wan blocks are expected to take hidden_states positionally",
                                          param="ulysses_degree")
            return (shard(args[0], 1, topology, "video tokens"), *args[1:]), kwargs

        transformer.register_forward_pre_hook(shard_timestep, with_kwargs=True)
        transformer.rope.register_forward_hook(shard_rope)
        transformer.blocks[0].register_forward_pre_hook(shard_first_block_input, with_kwargs=True)
        transformer.proj_out.register_forward_hook(gather_output_hook(1, topology))
        processor = WanSelfAttentionProcessor(topology)
        for block in transformer.modules():
            if isinstance(block, WanTransformerBlock):
                block.attn1.set_processor(processor)
