"""LASP-2H's softmax half: attention over an SP group by one all-gather of K/V (the llama3 context-parallel scheme
LASP-2H applies to the softmax layers of a hybrid model), in any layout, with packed documents. The config selects
it as `parallel.sp_method: allgather` (zigzag layout), for the softmax layers of any model kind.

Each rank starts the all-gather of its K/V shard, attends its queries to its own K/V while the gather is in flight,
then to every other rank's shard, merging partial outputs with the online-softmax rule. The per-pair kernel calls
(which blocks are visible under the causal mask by global position, and which document pairs meet) are the ring's
plans (ring.ring_plans), so zigzag layouts stay balanced: every rank's queries see the same number of causal
keys. Backward: every rank computes dK/dV contributions for all shards from the K/V kept in forward, and one
reduce-scatter sums them back to their owners.

Communication per layer:
    forward : one all_gather of this rank's K/V (2 x B x H_kv x S_local x D in the input dtype)
              (+ one all_gather of document ids per batch, shared with ring plans, when given)
    backward: one reduce_scatter of dK/dV for all shards (P x 2 x B x H_kv x S_local x D, accumulation dtype)
Memory: the gathered K/V of the whole sequence stays alive until backward (the price of not using a ring).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshweave.attention.lasp2 import segment_layout
from meshweave.attention.local import accum_dtype, default_scale
from meshweave.attention.masks import Segment
from meshweave.attention.merge import PartialAccumulator
from meshweave.attention.ring import attend_block, attend_block_backward, ring_plans
from meshweave.core.comm import CommGroup, single_process_group
from meshweave.models.attention_api import AttentionMeta, BatchCache


class _AllGatherKVAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group: CommGroup, plans, scale: float, backend: str):
        r, p = group.rank, group.size
        pending = group.all_gather_async(torch.stack([k, v]).unsqueeze(0))  # (P, 2, B, H_kv, S, D) when done
        acc = PartialAccumulator(q, accum_dtype(q.dtype))
        attend_block(q, k, v, plans[0], acc, scale, backend)  # own shard while the gather is in flight
        kv = pending.wait()
        for s in range(1, p):
            owner = (r - s) % p
            attend_block(q, kv[owner, 0], kv[owner, 1], plans[s], acc, scale, backend)
        ctx.save_for_backward(q, kv, acc.out, acc.lse)
        ctx.group, ctx.plans, ctx.scale, ctx.backend = group, plans, scale, backend
        return acc.out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, kv, out, lse = ctx.saved_tensors
        group, r, p = ctx.group, ctx.group.rank, ctx.group.size
        acc = accum_dtype(q.dtype)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
        dout = dout.contiguous()
        for s in range(p):
            owner = (r - s) % p
            attend_block_backward(dout, q, kv[owner, 0], kv[owner, 1], out, lse, ctx.plans[s], dq,
                                  dkv[owner, 0], dkv[owner, 1], ctx.scale, ctx.backend)
        mine = group.reduce_scatter(dkv, dim=0)[0] if p > 1 else dkv[0]
        return dq.to(q.dtype), mine[0].to(q.dtype), mine[1].to(q.dtype), None, None, None, None


def allgather_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: CommGroup,
                           segments: Sequence[Sequence[Segment]], causal: bool, scale: float,
                           document_ids: torch.Tensor | None = None, backend: str = "auto",
                           cache: BatchCache | None = None) -> torch.Tensor:
    """Softmax attention of this rank's queries over the whole sequence by all-gathering K/V.

    q: (B, H, S_local, D); k, v: (B, H_kv, S_local, D), heads first as in ring_attention; `segments[r]`: the global
    runs SP rank r holds; document_ids: (B, S_local) or None. Communicates: see the module docstring.
    """
    plans = ring_plans("ring", group, segments, causal, document_ids, cache)
    return _AllGatherKVAttention.apply(q, k, v, group, plans, scale, backend)


class AllGatherKVSequenceParallel:
    """LASP-2H's softmax op (an `AttentionOp`) over `group` in `method`'s layout (zigzag for ring/tokenring/allgather).

    The config's `sp_method: allgather` reaches `allgather_kv_attention` through attention.op instead (its own zigzag
    layout); this class runs the same scheme in another method's layout, as the tests and benchmarks compare it."""

    def __init__(self, group: CommGroup | None = None, method: str = "ring", ulysses_degree: int | None = None,
                 scale: float | None = None, backend: str = "auto") -> None:
        self.group = group if group is not None else single_process_group("sp")
        self.method, self.ulysses_degree, self.scale, self.backend = method, ulysses_degree, scale, backend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        segments = segment_layout(self.method, q.shape[1] * self.group.size, self.group.size, self.ulysses_degree)
        scale = self.scale if self.scale is not None else default_scale(q.shape[-1])
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        out = allgather_kv_attention(qt, kt, vt, self.group, segments, meta.causal, scale, meta.document_ids,
                                     self.backend, meta.cache)
        return out.transpose(1, 2)
