"""Sequence-parallel attention: Ulysses (all-to-all, sequence shards <-> head shards) combined with ring attention
(K/V blocks passed around, partial results merged with their log-sum-exp).

Joint text + image attention (FLUX, Qwen-Image): the text tokens are *replicated* on every rank and only the
image tokens are sharded. Text is short (a few hundred tokens against thousands of image tokens), its length
varies per prompt and may be masked, so sharding it would need padding and a mask per shard; replicating it
costs each rank the text tokens' share of the block compute once more. Inside attention:

* Ulysses: image q/k/v go through the all-to-all (each rank then holds all image tokens of its ring chunk for
  ``heads / ulysses_degree`` heads); the text q/k/v are simply sliced to the same heads (every rank has them).
  After attention, image outputs go back through the inverse all-to-all and text outputs are all-gathered
  over heads, so every rank again holds the full text stream.
* Ring: the local block is [text keys, my image chunk]; only image K/V chunks travel around the ring, so each
  text key is counted exactly once.

The result equals single-device attention up to floating-point rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ditserve.parallel.attention import PartialAttention, attention_with_lse
from ditserve.parallel.topology import ParallelTopology


@dataclass
class JointSequence:
    """q/k/v of one attention call, split into the replicated text prefix and this rank's image shard."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    #: leading tokens replicated on every rank (text of joint attention); 0 for pure self-attention
    joint_len: int = 0
    #: ``(B, joint_len)`` True where a joint (text) key is valid; image keys are never masked
    joint_key_mask: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------------- Ulysses
def _all_to_all(tensor: torch.Tensor, group: object) -> torch.Tensor:
    output = torch.empty_like(tensor)
    dist.all_to_all_single(output, tensor, group=group)
    return output


def sequence_to_heads(x: torch.Tensor, degree: int, group: object) -> torch.Tensor:
    """``(B, S_local, H, D)`` -> ``(B, degree * S_local, H / degree, D)``: gather the sequence, scatter heads."""
    b, s, h, d = x.shape
    send = x.reshape(b, s, degree, h // degree, d).permute(2, 0, 1, 3, 4).contiguous()
    received = _all_to_all(send, group)  # [j] = rank j's sequence shard, my heads
    return received.permute(1, 0, 2, 3, 4).reshape(b, degree * s, h // degree, d)


def heads_to_sequence(x: torch.Tensor, degree: int, group: object) -> torch.Tensor:
    """Inverse of ``sequence_to_heads``: ``(B, degree * S_local, H / degree, D)`` -> ``(B, S_local, H, D)``."""
    b, s_total, h, d = x.shape
    send = x.reshape(b, degree, s_total // degree, h, d).permute(1, 0, 2, 3, 4).contiguous()
    received = _all_to_all(send, group)  # [j] = my sequence shard, rank j's heads
    return received.permute(1, 2, 0, 3, 4).reshape(b, s_total // degree, degree * h, d)


def gather_heads(x: torch.Tensor, degree: int, group: object) -> torch.Tensor:
    """``(B, S, H / degree, D)`` on each rank -> ``(B, S, H, D)`` on every rank (heads in rank order)."""
    parts = [torch.empty_like(x) for _ in range(degree)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=2)


# ---------------------------------------------------------------------------------------------- ring
def _start_ring_exchange(block: torch.Tensor, topology: ParallelTopology) -> tuple[list, torch.Tensor]:
    """Send ``block`` to the next rank of the ring and receive the previous rank's, asynchronously."""
    received = torch.empty_like(block)
    ranks, me, group = topology.ring_ranks, topology.coordinates.ring_rank, topology.ring_group
    ops = [dist.P2POp(dist.isend, block, ranks[(me + 1) % len(ranks)], group=group),
           dist.P2POp(dist.irecv, received, ranks[(me - 1) % len(ranks)], group=group)]
    return dist.batch_isend_irecv(ops), received


def ring_attention(seq: JointSequence, topology: ParallelTopology) -> torch.Tensor:
    """Attention of the local queries over the joint keys and the image keys of every ring rank."""
    partial = PartialAttention()
    j = seq.joint_len
    image_kv = torch.stack([seq.key[:, j:], seq.value[:, j:]]).contiguous()
    ring_size = len(topology.ring_ranks)
    # NCCL moves the next block on its own stream while this one is computed. gloo's point-to-point transfer
    # barely progresses while the rank computes (measured: 20x slower overlapped), so there the exchange
    # follows the compute.
    overlap = dist.get_backend(topology.ring_group) == "nccl"
    key_mask = None
    if seq.joint_key_mask is not None:
        image_valid = torch.ones(seq.key.shape[0], seq.key.shape[1] - j, dtype=torch.bool, device=seq.key.device)
        key_mask = torch.cat([seq.joint_key_mask.to(torch.bool), image_valid], dim=1)
    for step in range(ring_size):
        last = step == ring_size - 1
        pending = None if last or not overlap else _start_ring_exchange(image_kv, topology)
        if step == 0:
            # joint keys are counted once, here, with my own image chunk
            partial.add(*attention_with_lse(seq.query, seq.key, seq.value, key_mask))
        else:
            partial.add(*attention_with_lse(seq.query, image_kv[0], image_kv[1]))
        if not last:
            requests, image_kv = pending if pending is not None else _start_ring_exchange(image_kv, topology)
            for request in requests:
                request.wait()
    return partial.result(seq.query.dtype)


def local_attention(seq: JointSequence) -> torch.Tensor:
    mask = None
    if seq.joint_key_mask is not None:
        image_valid = torch.ones(seq.key.shape[0], seq.key.shape[1] - seq.joint_len, dtype=torch.bool,
                                 device=seq.key.device)
        mask = torch.cat([seq.joint_key_mask.to(torch.bool), image_valid], dim=1)[:, None, None, :]
    q, k, v = (x.transpose(1, 2) for x in (seq.query, seq.key, seq.value))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


# ---------------------------------------------------------------------------------------------- combined
def _split_heads_for_ulysses(seq: JointSequence, topology: ParallelTopology) -> JointSequence:
    degree, group = topology.config.ulysses_degree, topology.ulysses_group
    j = seq.joint_len
    heads = seq.query.shape[2] // degree
    head_slice = slice(topology.coordinates.ulysses_rank * heads, (topology.coordinates.ulysses_rank + 1) * heads)

    def trade(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :j, head_slice], sequence_to_heads(x[:, j:], degree, group)], dim=1)

    return JointSequence(trade(seq.query), trade(seq.key), trade(seq.value), j, seq.joint_key_mask)


def _merge_heads_for_ulysses(out: torch.Tensor, joint_len: int, topology: ParallelTopology) -> torch.Tensor:
    degree, group = topology.config.ulysses_degree, topology.ulysses_group
    joint = gather_heads(out[:, :joint_len], degree, group)
    image = heads_to_sequence(out[:, joint_len:].contiguous(), degree, group)
    return torch.cat([joint, image], dim=1)


def sequence_parallel_attention(seq: JointSequence, topology: ParallelTopology) -> torch.Tensor:
    """Full attention over the whole (sharded) sequence; returns this rank's rows ``(B, S_local, H, D)``."""
    config = topology.config
    ulysses = config.ulysses_degree > 1
    if ulysses:
        seq = _split_heads_for_ulysses(seq, topology)
    out = ring_attention(seq, topology) if config.ring_degree > 1 else local_attention(seq)
    if ulysses:
        out = _merge_heads_for_ulysses(out, seq.joint_len, topology)
    return out
