"""Attention over one whole block whose kernel calls cover every query row and every key row exactly once.

That is the case of a ring of one rank (Ulysses after its all-to-all, USP without a ring): the rank holds
whole sequences, and the plan is one FULL/CAUSAL call, one call per packed document, or one dense-mask call.
Then each call's (out, lse) is already final and its gradients are the whole gradient of its rows, so this
path writes them straight into the result: no zero-filled fp32 accumulators, no merge of a single partial,
no contiguous copies of the (transposed) inputs, and the backward calls the local backward directly.
A plan that does not tile the rows exactly once (a document id that recurs after another document) takes
the ring path instead (ring.py), which merges.

Pure computation: no communication.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshweave.attention.local import accum_dtype, block_backward, block_forward
from meshweave.attention.masks import BlockCall

Rect = tuple[range, range]  # (batch rows, sequence rows) of one call


def covers_once(plan: Sequence[BlockCall], batch: int, sq: int, sk: int) -> bool:
    """True when the calls' (batch x query rows) rectangles tile the (batch, sq) grid exactly once, and their
    (batch x key rows) rectangles the (batch, sk) grid. Host work over the plan only (a few calls)."""
    queries = [(range(*c.batch.indices(batch)), range(*c.q_rows.indices(sq))) for c in plan]
    keys = [(range(*c.batch.indices(batch)), range(*c.k_rows.indices(sk))) for c in plan]
    return bool(plan) and _tiles(queries, batch * sq) and _tiles(keys, batch * sk)


def _tiles(rects: list[Rect], area: int) -> bool:
    """Disjoint rectangles whose areas add up to the grid's area cover it exactly once."""
    if sum(len(b) * len(r) for b, r in rects) != area:
        return False
    return not any(_overlap(a, b) for i, a in enumerate(rects) for b in rects[i + 1 :])


def _overlap(a: Rect, b: Rect) -> bool:
    return all(x.start < y.stop and y.start < x.stop for x, y in zip(a, b))


def _forward(q, k, v, plan: Sequence[BlockCall], scale: float, backend: str):
    if len(plan) == 1:  # the whole block in one kernel call: its result is the result
        return block_forward(q, k, v, plan[0].mask, scale, backend)
    acc = accum_dtype(q.dtype)
    out = torch.empty(q.shape, dtype=acc, device=q.device)  # every row is written once: no fill needed
    lse = torch.empty(q.shape[:3], dtype=acc, device=q.device)
    for call in plan:
        b, r, c = call.batch, call.q_rows, call.k_rows
        out[b, :, r], lse[b, :, r] = block_forward(q[b, :, r], k[b, :, c], v[b, :, c], call.mask, scale, backend)
    return out, lse


def _backward(dout, q, k, v, out, lse, plan: Sequence[BlockCall], scale: float, backend: str):
    if len(plan) == 1:
        return block_backward(dout, q, k, v, out, lse, plan[0].mask, scale, backend)
    acc = accum_dtype(q.dtype)
    dq, dk, dv = (torch.empty(t.shape, dtype=acc, device=t.device) for t in (q, k, v))
    for call in plan:
        b, r, c = call.batch, call.q_rows, call.k_rows
        dq[b, :, r], dk[b, :, c], dv[b, :, c] = block_backward(
            dout[b, :, r], q[b, :, r], k[b, :, c], v[b, :, c], out[b, :, r], lse[b, :, r], call.mask, scale, backend
        )
    return dq, dk, dv


class _SingleBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, scale, backend):
        out, lse = _forward(q, k, v, plan, scale, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.backend = plan, scale, backend
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, out, lse, ctx.plan, ctx.scale, ctx.backend)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def single_block_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Sequence[BlockCall], scale: float, backend: str = "auto"
) -> torch.Tensor:
    """q (B,H,S,D) over k, v (B,H_kv,S_k,D) by `plan`, which must cover every row once (see covers_once);
    returns out (B,H,S,D) in q's dtype. Inputs may be strided views (the kernels take any row/head strides)."""
    return _SingleBlock.apply(q, k, v, plan, scale, backend)
