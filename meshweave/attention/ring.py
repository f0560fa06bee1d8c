"""Ring attention: Q stays, K/V travel around the ring; zigzag layout balances causal work.

Hand-written because no maintained library runs a ring with packed-document masks on gloo/CPU
through our accounted CommGroup (torch's `_templated_ring_attention` is private API and has no
document masking; ring-flash-attn needs CUDA).

Forward, rank r of P: at step s it holds the K/V block of rank (r - s) mod P. The transfer of the
next block (send to r+1, receive from r-1) is posted *before* the current block is computed, so
on a backend with asynchronous P2P they overlap. Partials are merged in fp32 (fp64 for fp64).
Backward: K/V go around again; each rank adds its dK/dV contribution for the block it holds to an
accumulator that travels with the block one step behind and, after P hops, arrives home.

Communication per call (elements; e = input element size, a = accumulation element size,
KV = 2 * B * H_kv * S_local * D):
    forward : P-1 sends + P-1 receives of KV * e           (+1 all_gather of document ids)
    backward: P-1 sends + P-1 receives of KV * e, then P sends + P receives of KV * a (dK/dV)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from meshweave.attention.local import accum_dtype, block_backward, block_forward
from meshweave.attention.masks import BlockCall, Segment, plan_block
from meshweave.attention.merge import PartialAccumulator
from meshweave.attention.ring_comm import (
    next_rank,
    prev_rank,
    start_exchange,
)
from meshweave.attention.single_block import covers_once, single_block_attention
from meshweave.core.comm import CommGroup
from meshweave.models.attention_api import BatchCache

Plan = list[BlockCall]
T = TypeVar("T")


def cached(cache: BatchCache | None, key: tuple, compute: Callable[[], T]) -> T:
    """compute() once per batch: the result is kept in the batch's attention cache (AttentionMeta.cache),
    so the document-id exchange and the mask plans (host work) are done by the first layer only."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def ring_plans(kind: str, group: CommGroup, segments: Sequence[Sequence[Segment]], causal: bool,
               document_ids: torch.Tensor | None, cache: BatchCache | None) -> list[Plan]:
    """Per-step plans of a ring-style method ("ring": K/V travel; "tokenring": Q travels), once per batch.

    Planning is host work over document-id runs: the gathered ids are copied to the host in one transfer
    (the batch's only device-to-host read), planned there, and dense masks go back to the device
    without waiting. Communicates: one all_gather of document ids over `group` (when given), on the
    first call of a batch.
    """
    def compute() -> list[Plan]:
        docs = None
        if document_ids is not None:
            docs = list(group.all_gather(document_ids.contiguous(), dim=0).cpu().chunk(group.size))
        r, p = group.rank, group.size
        if kind == "ring":
            plans = step_plans(group, lambda s: r, lambda s: (r - s) % p, segments, causal, docs)
        else:
            plans = step_plans(group, lambda s: (r - s) % p, lambda s: r, segments, causal, docs)
        device = document_ids.device if document_ids is not None else torch.device("cpu")
        return [[_mask_to(call, device) for call in plan] for plan in plans]

    key = (kind, group.name, tuple(group.ranks), tuple(map(tuple, segments)), causal)
    return cached(cache, key, compute)


def step_plans(
    group: CommGroup,
    q_owner_of_step,
    kv_owner_of_step,
    segments: Sequence[Sequence[Segment]],
    causal: bool,
    docs: Sequence[torch.Tensor] | None,
) -> list[Plan]:
    """For each step s, the kernel calls for (queries of q_owner(s)) x (keys of kv_owner(s))."""
    plans = []
    for s in range(group.size):
        qo, ko = q_owner_of_step(s), kv_owner_of_step(s)
        plans.append(plan_block(segments[qo], segments[ko], causal, docs[qo] if docs else None, docs[ko] if docs else None))
    return plans


def _mask_to(call: BlockCall, device: torch.device) -> BlockCall:
    if not isinstance(call.mask, torch.Tensor) or call.mask.device == device:
        return call
    return BlockCall(call.q_rows, call.k_rows, call.mask.to(device, non_blocking=True), call.batch)


def attend_block(q, k, v, plan: Plan, acc: PartialAccumulator, scale: float, backend: str) -> None:
    """Merge the partials of every call of `plan` into `acc`. No communication."""
    for call in plan:
        b, r, c = call.batch, call.q_rows, call.k_rows
        out, lse = block_forward(q[b, :, r], k[b, :, c], v[b, :, c], call.mask, scale, backend)
        acc.add(r, out, lse, b)


def attend_block_backward(dout, q, k, v, out, lse, plan: Plan, dq, dk, dv, scale: float, backend: str) -> None:
    """Add the block's gradient contributions into dq (query rows) and dk, dv (key rows)."""
    for call in plan:
        b, r, c = call.batch, call.q_rows, call.k_rows
        gq, gk, gv = block_backward(
            dout[b, :, r], q[b, :, r], k[b, :, c], v[b, :, c], out[b, :, r], lse[b, :, r], call.mask, scale, backend
        )
        dq[b, :, r] += gq
        dk[b, :, c] += gk
        dv[b, :, c] += gv


def _ring_forward(q, k, v, group: CommGroup, plans: list[Plan], scale: float, backend: str):
    acc = PartialAccumulator(q, accum_dtype(q.dtype))
    kv = torch.stack([k, v])
    for s in range(group.size):
        work = None
        if s < group.size - 1:
            incoming = torch.empty_like(kv)
            work = start_exchange(group, [(kv, next_rank(group))], [(incoming, prev_rank(group))])
        attend_block(q, kv[0], kv[1], plans[s], acc, scale, backend)
        if work is not None:
            work.wait()
            kv = incoming
    return acc.out, acc.lse


def _ring_backward(dout, q, k, v, out, lse, group: CommGroup, plans: list[Plan], scale: float, backend: str):
    acc = accum_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    dkv_done = None  # accumulator of the block held in the previous step, ready to travel on
    for s in range(group.size):
        sends, recvs = [], []
        if s < group.size - 1:
            kv_next = torch.empty_like(kv)
            sends.append((kv, next_rank(group)))
            recvs.append((kv_next, prev_rank(group)))
        if s > 0:
            dkv_in = torch.empty(kv.shape, dtype=acc, device=kv.device)
            sends.append((dkv_done, next_rank(group)))
            recvs.append((dkv_in, prev_rank(group)))
        work = start_exchange(group, sends, recvs)
        dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
        attend_block_backward(dout, q, kv[0], kv[1], out, lse, plans[s], dq, dkv[0], dkv[1], scale, backend)
        work.wait()
        if s > 0:
            dkv += dkv_in
        dkv_done = dkv
        if s < group.size - 1:
            kv = kv_next
    if group.size > 1:  # the last accumulator is one hop from home
        home = torch.empty_like(dkv_done)
        start_exchange(group, [(dkv_done, next_rank(group))], [(home, prev_rank(group))]).wait()
        dkv_done = home
    return dq, dkv_done[0], dkv_done[1]


def blockwise_autograd(forward_fn, backward_fn) -> type[torch.autograd.Function]:
    """An autograd Function around a ring-style pair: forward_fn(q, k, v, group, plans, scale, backend) ->
    (out, lse), and backward_fn(dout, q, k, v, out, lse, group, plans, scale, backend) -> (dq, dk, dv).
    Ring and TokenRing differ only in what they send; the autograd bookkeeping is the same."""

    class _Blockwise(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, group, plans, scale, backend):
            out, lse = forward_fn(q, k, v, group, plans, scale, backend)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.group, ctx.plans, ctx.scale, ctx.backend = group, plans, scale, backend
            return out.to(q.dtype)

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            dq, dk, dv = backward_fn(dout.contiguous(), q, k, v, out, lse, ctx.group, ctx.plans, ctx.scale, ctx.backend)
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None

    return _Blockwise


_RingAttention = blockwise_autograd(_ring_forward, _ring_backward)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: CommGroup,
    segments: Sequence[Sequence[Segment]],
    causal: bool,
    scale: float,
    document_ids: torch.Tensor | None = None,
    backend: str = "auto",
    cache: BatchCache | None = None,
) -> torch.Tensor:
    """Ring attention of this rank's q (B,H,S,D) over every rank's k, v (B,H_kv,S,D); returns out (B,H,S,D).

    segments[i]: the global position runs held by group rank i (e.g. its zigzag pair).
    document_ids: (B, S) ids of this rank's tokens, or None. cache: the batch's attention cache, in which
    the gathered ids and plans are kept for the next layers. Communicates: see the module docstring
    (one all_gather of document ids per batch when given; none at all when the group has size 1).
    A ring of one rank whose plan covers every row once (Ulysses, USP without a ring) skips the ring
    machinery: single_block.py writes the kernel results directly.
    """
    plans = ring_plans("ring", group, segments, causal, document_ids, cache)
    if group.size == 1 and _single_block(plans[0], q, k, group, segments, causal, cache):
        return single_block_attention(q, k, v, plans[0], scale, backend)
    return _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), group, plans, scale, backend)


def _single_block(plan: Plan, q, k, group: CommGroup, segments, causal: bool, cache: BatchCache | None) -> bool:
    """Whether the one-rank plan tiles the rows exactly once (decided once per batch, with the plan)."""
    key = ("ring_single_block", group.name, tuple(map(tuple, segments)), causal, q.shape[0], q.shape[2], k.shape[2])
    return cached(cache, key, lambda: covers_once(plan, q.shape[0], q.shape[2], k.shape[2]))
