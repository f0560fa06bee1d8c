"""The Ulysses all-to-alls: sequence-sharded <-> head-sharded, as differentiable ops.

seq_to_head: (B, S/P, H, D) on each rank -> (B, S, H/P, D): rank u keeps heads [u H/P, (u+1) H/P)
of the whole (gathered) sequence, in group-rank order of the sequence shards.
head_to_seq: the inverse. The backward of each is the other one applied to the gradient.
Each call is one `all_to_all_single` through the CommGroup (payload = the local tensor).
"""

from __future__ import annotations

import torch

from meshweave.core.comm import CommGroup


def _seq_to_head(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    p = group.size
    b, s, h, d = x.shape
    if h % p:
        raise ValueError(f"ulysses all-to-all needs heads ({h}) divisible by the group size ({p})")
    send = x.reshape(b, s, p, h // p, d).permute(2, 0, 1, 3, 4).contiguous()  # (P, B, S, H/P, D)
    recv = torch.empty_like(send)
    group.all_to_all_single(recv, send)  # recv[i] = sequence shard i, my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(b, p * s, h // p, d)


def _head_to_seq(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    p = group.size
    b, s_full, hp, d = x.shape
    send = x.reshape(b, p, s_full // p, hp, d).permute(1, 0, 2, 3, 4).contiguous()  # (P, B, S/P, H/P, D)
    recv = torch.empty_like(send)
    group.all_to_all_single(recv, send)  # recv[i] = my sequence shard, head chunk i
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s_full // p, p * hp, d)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_head(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _head_to_seq(grad, ctx.group), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _head_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_head(grad, ctx.group), None


def seq_to_head(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """(B, S_local, H, D) -> (B, S_local * P, H / P, D). One all_to_all forward, one backward."""
    return x if group.size == 1 else _SeqToHead.apply(x, group)


def head_to_seq(x: torch.Tensor, group: CommGroup) -> torch.Tensor:
    """(B, S_local * P, H / P, D) -> (B, S_local, H, D). One all_to_all forward, one backward."""
    return x if group.size == 1 else _HeadToSeq.apply(x, group)


def replicate_kv_heads(k: torch.Tensor, v: torch.Tensor, degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat kv heads (dim 2) so that `degree` divides their count (needs degree % H_kv == 0)."""
    h_kv = k.shape[2]
    if h_kv % degree == 0:
        return k, v
    if degree % h_kv:
        raise ValueError(f"ulysses needs kv heads ({h_kv}) divisible by, or dividing, the ulysses degree ({degree})")
    rep = degree // h_kv
    return k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)


def gather_sequence_ids(ids: torch.Tensor | None, group: CommGroup) -> torch.Tensor | None:
    """(B, S_local) ids of every rank of `group`, concatenated along the sequence in rank order.

    Communicates: one all_gather (none when ids is None or the group has size 1).
    """
    return None if ids is None else group.all_gather(ids.contiguous(), dim=1)
