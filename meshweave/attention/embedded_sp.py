"""Embedded sequence parallelism on a factorised (spatial/temporal) model: the strong baselines for DSP.

`sp_method: ring` on st_dit runs `factorised_ring`; `factorised_ulysses` is the stronger Ulysses baseline, which
benchmarks/bench_dsp.py installs beside `sp_method: ulysses` (Ulysses as a generic runtime applies it, every
attention communicating: attention/flattened_ulysses.py).

As a one-dimensional SP method does, the activations (B, T, S, C) stay sharded on one fixed dim for the whole
model (dim 1, the frames, as Open-Sora's sequence parallelism before DSP did): blocks attending over another dim
run locally (what a generic runtime, which does not know the model's attention is factorised, cannot do), and
the attention of blocks attending over the sharded dim communicates inside, Ulysses-style: q, k, v
go from sequence-sharded to head-sharded with one all-to-all each (dsp_comm.reshard: the sequence dim gathered
and trimmed, the heads scattered and zero-padded when they do not divide by P), attention runs on whole
sequences of H/P heads, and one all-to-all brings the output back. Per such block: 4 all-to-alls of the
activations' size forward and 4 backward, against DSP's one per switch each way. `factorised_ring` is the
ring alternative inside those blocks: K/V chunks passed around the ring instead of the all-to-alls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshweave.attention.dsp_comm import chunk_length, reshard, take_chunk
from meshweave.core.comm import P2P, CommGroup
from meshweave.models.attention_api import AttentionMeta, AttentionOp, local_attention

SEQ, HEADS = 1, 2  # dims of q/k/v (B', N, H, D)


class EmbeddedLayout:
    """The LayoutOp that shards dim `dim` of the activations at entry and keeps it sharded (no switches)."""

    def __init__(self, group: CommGroup, dim: int) -> None:
        self.group, self.dim = group, dim

    def enter(self, x: torch.Tensor, attends: Sequence[int | None]) -> torch.Tensor:
        return take_chunk(x, self.dim, self.group.size, self.group.rank) if self.group.size > 1 else x

    def before_block(self, x: torch.Tensor, sizes: Sequence[int], attends: Sequence[int | None], i: int) -> torch.Tensor:
        return x

    def samples(self, c: torch.Tensor, sizes: Sequence[int], attends: Sequence[int | None], i: int) -> torch.Tensor:
        return c

    def start(self, sizes: Sequence[int], attends: Sequence[int | None], i: int, dim: int) -> int:
        return self.group.rank * chunk_length(int(sizes[dim]), self.group.size) if dim == self.dim else 0

    def exit(self, x: torch.Tensor, sizes: Sequence[int], attends: Sequence[int | None]) -> tuple[torch.Tensor, tuple[int, ...]]:
        starts = [0] * len(sizes)
        if self.group.size == 1:
            return x, tuple(starts)
        c = chunk_length(int(sizes[self.dim]), self.group.size)
        starts[self.dim] = min(self.group.rank * c, int(sizes[self.dim]))
        return x.narrow(self.dim, 0, max(0, min(c, int(sizes[self.dim]) - starts[self.dim]))), tuple(starts)


def factorised_ulysses(group: CommGroup) -> AttentionOp:
    """Attention for the slots of a factorised model under the embedded layout. When q/k/v hold a part of the
    sequence (q.shape[1] < meta.seq_len, the whole length): all-to-all to whole sequences of a slice of the heads,
    local attention, all-to-all back (4 all-to-alls forward, 4 backward); when they hold all of it, local."""

    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        n = meta.seq_len if meta.seq_len is not None else q.shape[SEQ]
        if group.size == 1 or q.shape[SEQ] >= n:
            return local_attention(q, k, v, meta)
        heads = q.shape[HEADS]
        q, k, v = (reshard(t, group, HEADS, SEQ, heads, n) for t in (q, k, v))
        return reshard(local_attention(q, k, v, meta), group, SEQ, HEADS, n, heads)

    return op


class _RingShift(torch.autograd.Function):
    """x to the next rank of the ring, the previous rank's x back; backward shifts the gradient the other way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: CommGroup, step: int) -> torch.Tensor:
        ctx.group, ctx.step = group, step
        return _shift(x.contiguous(), group, step)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _shift(grad.contiguous(), ctx.group, -ctx.step), None, None


def _shift(x: torch.Tensor, group: CommGroup, step: int) -> torch.Tensor:
    out = torch.empty_like(x)
    to, frm = (group.rank + step) % group.size, (group.rank - step) % group.size
    group.batch_isend_irecv([P2P("send", x, to), P2P("recv", out, frm)]).wait()
    return out


def factorised_ring(group: CommGroup) -> AttentionOp:
    """Non-causal ring attention for the slots of a factorised model under the embedded layout: K/V chunks travel
    around the ring (P-1 shifts of K and V stacked forward, of their gradients backward), each rank attends its queries to
    every chunk (padding keys masked) and merges the partial results by their log-sum-exp. Written with autograd
    through the shifts: a baseline for byte counts and correctness, not a tuned kernel (meshweave's ring op for
    one-dimensional sequences is attention/ring.py)."""

    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        n = meta.seq_len if meta.seq_len is not None else q.shape[SEQ]
        if group.size == 1 or q.shape[SEQ] >= n:
            return local_attention(q, k, v, meta)
        c, scale = q.shape[SEQ], q.shape[-1] ** -0.5
        qh = q.transpose(1, 2)  # (B', H, c, D)
        # K and V travel as one tensor, one chain of shifts: every rank runs the backward shifts in the same order.
        kv = torch.stack([k, v])
        outs, lses, unused = [], [], []
        for step in range(group.size):
            owner = (group.rank - step) % group.size  # whose chunk of K/V this rank holds now
            real = max(0, min(c, n - owner * c))
            if real:
                kh, vh = kv[0].transpose(1, 2), kv[1].transpose(1, 2)
                scores = (qh @ kh.transpose(-1, -2)) * scale  # (B', H, c, c)
                scores = scores.masked_fill(torch.arange(c, device=q.device) >= real, float("-inf"))
                lses.append(torch.logsumexp(scores, dim=-1))
                outs.append(torch.softmax(scores, dim=-1) @ vh)
            else:  # a chunk of padding only: kept in the graph so that its shift's backward runs on every rank
                unused.append(kv.sum() * 0)
            if step < group.size - 1:
                kv = _RingShift.apply(kv, group, 1)
        total = torch.logsumexp(torch.stack(lses), dim=0)
        out = sum(torch.exp(lse - total)[..., None] * o for lse, o in zip(lses, outs))
        out = out + sum(unused) if unused else out
        return out.transpose(1, 2)

    return op
