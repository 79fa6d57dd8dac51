"""Sequence parallelism for FLUX.1 (FluxTransformer2DModel).

Sharded: the image tokens (``hidden_states`` on dim 1; on FLUX.1-Kontext the noisy tokens, then the input
image's) and their position ids (``img_ids`` on dim 0), so the rotary embedding computed from
``cat(txt_ids, img_ids)`` matches the local tokens. Replicated: the text tokens
(``encoder_hidden_states``, ``txt_ids``), see ``ditserve.parallel.sequence``. Every attention (double blocks:
text and image projected separately then joined; single blocks: one stream that starts with the text tokens)
goes through ``sequence_parallel_attention``; the output projection ``proj_out`` is gathered back.

Tensor parallelism: double blocks split both streams' q/k/v by heads and their output projections by rows,
and both feed-forwards (``ff``, ``ff_context``). Single blocks split q/k/v and ``proj_mlp`` by columns; their
``proj_out`` reads ``cat(attention output, mlp output)``, so its input columns are split in two blocks alike.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.parallel.families.base import FamilyPlan, split_joint_attention_blocks, token_output_shape
from ditserve.parallel.sequence import JointSequence, sequence_parallel_attention
from ditserve.parallel.sharding import gather_output_hook, shard_kwargs_hook
from ditserve.parallel.tensor import TensorSplit
from ditserve.parallel.topology import ParallelTopology


class _TextLength:
    """Text tokens of the current forward: single blocks see one stream and need it to find the text prefix."""

    value = 0


def _heads(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    return tensor.unflatten(-1, (-1, head_dim))


class FluxSequenceParallelProcessor:
    """FLUX attention (same projections, q/k norms and rotary as diffusers' FluxAttnProcessor) with the
    attention itself computed over the sequence shards of every rank."""

    def __init__(self, topology: ParallelTopology, text_length: _TextLength) -> None:
        self.topology = topology
        self.text_length = text_length

    def _projections(self, attn: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if getattr(attn, "fused_projections", False):
            return attn.to_qkv(hidden_states).chunk(3, dim=-1)
        return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)

    def _added_projections(self, attn: Any, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if getattr(attn, "fused_projections", False):
            return attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        return (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states),
                attn.add_v_proj(encoder_hidden_states))

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        if attention_mask is not None:
            raise NotImplementedError("FLUX sequence parallelism takes no attention_mask (FLUX passes none)")
        query, key, value = (_heads(x, attn.head_dim) for x in self._projections(attn, hidden_states))
        query, key = attn.norm_q(query), attn.norm_k(key)
        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            text_q, text_k, text_v = (_heads(x, attn.head_dim)
                                      for x in self._added_projections(attn, encoder_hidden_states))
            query = torch.cat([attn.norm_added_q(text_q), query], dim=1)
            key = torch.cat([attn.norm_added_k(text_k), key], dim=1)
            value = torch.cat([text_v, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        text_len = encoder_hidden_states.shape[1] if joint else self.text_length.value
        out = sequence_parallel_attention(JointSequence(query, key, value, joint_len=text_len), self.topology)
        out = out.flatten(2, 3).to(query.dtype)
        if not joint:
            return out
        text_out, image_out = out[:, :text_len], out[:, text_len:]
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


class FluxPlan(FamilyPlan):
    pipeline_class_names = ("FluxPipeline", "FluxKontextPipeline")

    def output_shape(self, transformer: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[int, ...]:
        return token_output_shape(transformer, kwargs)

    def attention_heads(self, transformer: torch.nn.Module) -> int:
        return int(transformer.config.num_attention_heads)

    def sharded_tokens(self, adapter: Any, params: OmniDiffusionSamplingParams) -> int:
        # latents are packed 2x2 after the VAE: one token per (2 * vae_scale_factor)^2 pixels. The output's
        # tokens; Kontext's input-image tokens are checked when the batch is sharded
        patch = 2 * int(adapter.pipeline.vae_scale_factor)
        return (params.height // patch) * (params.width // patch)

    def split_tensor_parallel(self, transformer: torch.nn.Module, split: TensorSplit) -> None:
        split_joint_attention_blocks(transformer, split, feed_forwards=("ff", "ff_context"))
        for index, block in enumerate(transformer.single_transformer_blocks):
            attention_width = block.attn.inner_dim  # read before the split makes it local
            split.attention(block.attn, column=("to_q", "to_k", "to_v"), row=())
            split.column(block, "proj_mlp", f"single_transformer_blocks.{index}.proj_mlp")
            split.packed_row(block, "proj_out", (attention_width, block.mlp_hidden_dim),
                             f"single_transformer_blocks.{index}.proj_out")

    def install(self, transformer: torch.nn.Module, topology: ParallelTopology) -> None:
        text_length = _TextLength()

        def remember_text_length(kwargs: dict[str, Any]) -> None:
            text_length.value = kwargs["encoder_hidden_states"].shape[1]

        transformer.register_forward_pre_hook(
            shard_kwargs_hook((("hidden_states", 1), ("img_ids", 0)), topology, remember_text_length),
            with_kwargs=True)
        transformer.proj_out.register_forward_hook(gather_output_hook(1, topology))
        processor = FluxSequenceParallelProcessor(topology, text_length)
        for module in transformer.modules():
            if isinstance(module, FluxAttention):
                module.set_processor(processor)
