"""Attention that also returns its log-sum-exp, and the merge of partial results computed on key blocks.

Ring attention computes each query block against one key/value block at a time; the partial outputs are
combined exactly with their log-sum-exp (LSE): for blocks ``i`` with outputs ``o_i`` and LSE ``l_i``,
``o = sum_i exp(l_i - L) o_i`` with ``L = logsumexp_i l_i``. No CPU attention backend returns the LSE, so on
CPU it is computed here with plain matmuls (fine for the short blocks CPU runs see); on CUDA the flash or
memory-efficient SDPA kernels return it.

Layout everywhere: ``(batch, sequence, heads, head_dim)``, as diffusers' attention processors use.
"""

from __future__ import annotations

import math

import torch


def _math_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    # scores in float32: the LSE feeds exponentials in the merge, where half precision would lose digits
    q, k, v = (x.transpose(1, 2).float() for x in (query, key, value))
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2), lse.transpose(1, 2)


def _cuda_attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    if key_mask is None and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[:2]
    else:
        bias = None
        if key_mask is not None:
            bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~key_mask, float("-inf"))[:, None, None, :].expand(-1, q.shape[1], q.shape[2], -1)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[:2]
        # the efficient kernel pads the LSE's sequence dimension to a multiple of its block size
        lse = lse[..., :q.shape[2]]
    return out.transpose(1, 2), lse.transpose(1, 2).float()


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``query`` over ``key``/``value``; returns the output ``(B, Sq, H, D)`` (float32 on
    CPU, the input dtype on CUDA) and the LSE ``(B, Sq, H)`` in float32. ``key_mask`` ``(B, Sk)``: True keeps."""
    if query.device.type == "cuda":
        return _cuda_attention_with_lse(query, key, value, key_mask)
    return _math_attention_with_lse(query, key, value, key_mask)


class PartialAttention:
    """Running merge of partial attention results over key blocks (in float32)."""

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        out = out.float()
        if self.out is None:
            self.out, self.lse = out, lse
            return
        merged_lse = torch.logaddexp(self.lse, lse)
        self.out = (self.out * torch.exp(self.lse - merged_lse).unsqueeze(-1)
                    + out * torch.exp(lse - merged_lse).unsqueeze(-1))
        self.lse = merged_lse

    def result(self, dtype: torch.dtype) -> torch.Tensor:
        assert self.out is not None, "no block was added"
        return self.out.to(dtype)
