"""Sequence parallelism for Qwen-Image and its edit and layered variants (QwenImageTransformer2DModel).

Sharded: the image tokens (``hidden_states`` dim 1: the noisy latents, then the input images' latents of edit
models), their rotary frequencies (the first output of ``pos_embed``, dim 0) and, for zero-cond models, the
per-token ``modulate_index`` of each block. Replicated: the text stream and its mask; the mask covers text
keys only, which every rank holds, so it never needs a shard (see ``ditserve.parallel.sequence``).

Tensor parallelism: the joint attention's image and text q/k/v by heads (per-head q/k norms unchanged), both
output projections by rows, and both streams' feed-forwards (``img_mlp``, ``txt_mlp``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

from ditserve.config import OmniDiffusionSamplingParams
from ditserve.parallel.families.base import FamilyPlan, split_joint_attention_blocks, token_output_shape
from ditserve.parallel.sequence import JointSequence, sequence_parallel_attention
from ditserve.parallel.sharding import gather_output_hook, shard, shard_kwargs_hook
from ditserve.parallel.tensor import TensorSplit
from ditserve.parallel.topology import ParallelTopology


def _heads(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    return tensor.unflatten(-1, (-1, head_dim))


def _norm(norm: Any, tensor: torch.Tensor) -> torch.Tensor:
    return norm(tensor) if norm is not None else tensor


class QwenImageSequenceParallelProcessor:
    """Qwen-Image joint attention (same projections, q/k norms and complex rotary as diffusers'
    QwenDoubleStreamAttnProcessor2_0) computed over the sequence shards of every rank."""

    def __init__(self, topology: ParallelTopology) -> None:
        self.topology = topology

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor = None,
                 encoder_hidden_states_mask: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
        if attention_mask is not None:
            raise NotImplementedError("Qwen-Image builds its mask from encoder_hidden_states_mask; got attention_mask")
        head_dim = attn.inner_dim // attn.heads
        image_q = _norm(attn.norm_q, _heads(attn.to_q(hidden_states), head_dim))
        image_k = _norm(attn.norm_k, _heads(attn.to_k(hidden_states), head_dim))
        image_v = _heads(attn.to_v(hidden_states), head_dim)
        text_q = _norm(attn.norm_added_q, _heads(attn.add_q_proj(encoder_hidden_states), head_dim))
        text_k = _norm(attn.norm_added_k, _heads(attn.add_k_proj(encoder_hidden_states), head_dim))
        text_v = _heads(attn.add_v_proj(encoder_hidden_states), head_dim)
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            image_q, image_k = (apply_rotary_emb_qwen(x, image_freqs, use_real=False) for x in (image_q, image_k))
            text_q, text_k = (apply_rotary_emb_qwen(x, text_freqs, use_real=False) for x in (text_q, text_k))

        text_len = encoder_hidden_states.shape[1]
        seq = JointSequence(torch.cat([text_q, image_q], dim=1), torch.cat([text_k, image_k], dim=1),
                            torch.cat([text_v, image_v], dim=1), joint_len=text_len,
                            joint_key_mask=encoder_hidden_states_mask)
        out = sequence_parallel_attention(seq, self.topology).flatten(2, 3).to(seq.query.dtype)
        image_out = attn.to_out[0](out[:, text_len:].contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(out[:, :text_len].contiguous())


class QwenImagePlan(FamilyPlan):
    pipeline_class_names = ("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageEditPlusPipeline",
                            "QwenImageLayeredPipeline")

    def output_shape(self, transformer: torch.nn.Module, kwargs: dict[str, Any]) -> tuple[int, ...]:
        return token_output_shape(transformer, kwargs)

    def attention_heads(self, transformer: torch.nn.Module) -> int:
        return int(transformer.config.num_attention_heads)

    def sharded_tokens(self, adapter: Any, params: OmniDiffusionSamplingParams) -> int:
        # one output image's tokens (Layered's layers each have as many); an edit model's input-image tokens are
        # checked when the batch is sharded
        _, rows, columns = adapter.latent_grid(params.height, params.width)
        return rows * columns

    def split_tensor_parallel(self, transformer: torch.nn.Module, split: TensorSplit) -> None:
        split_joint_attention_blocks(transformer, split, feed_forwards=("img_mlp", "txt_mlp"))

    def install(self, transformer: torch.nn.Module, topology: ParallelTopology) -> None:
        transformer.register_forward_pre_hook(shard_kwargs_hook((("hidden_states", 1),), topology),
                                              with_kwargs=True)

        def shard_image_freqs(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            image_freqs, text_freqs = output
            return shard(image_freqs, 0, topology, "image rotary frequencies"), text_freqs

        transformer.pos_embed.register_forward_hook(shard_image_freqs)
        for block in transformer.transformer_blocks:
            block.register_forward_pre_hook(shard_kwargs_hook((("modulate_index", 1),), topology),
                                            with_kwargs=True)
        transformer.proj_out.register_forward_hook(gather_output_hook(1, topology))
        processor = QwenImageSequenceParallelProcessor(topology)
        for block in transformer.transformer_blocks:
            block.attn.set_processor(processor)
