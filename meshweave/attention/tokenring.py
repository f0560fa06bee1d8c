"""TokenRing: K/V stay put; Q travels one way and partial results travel back, concurrently.

Hand-written: the public TokenRing code (ACA-Lab-SJTU/token-ring) is CUDA-only and has no
backward; the backward below is our own design.

Forward, rank r of P (zigzag layout): at step s it holds the queries of rank j = (r - s) mod P and
computes their partial (out, lse) against its own K/V. One batch per step posts, together,
the queries for step s+1 (send to r+1, receive from r-1) and the packed partial (out | lse) of step
s-1 straight back to its owner (send to r-(s-1), receive from r+(s-1)). The owner merges the
partials in a fixed order (fp32, fp64 for fp64).

Backward: the gradient of a (Q_j, KV_r) block needs Q_j, dO_j and the global O_j, lse_j of the
query owner, and contributes dK_r, dV_r (which stay on rank r: no dK/dV traffic at all) and dQ_j
(which goes back to its owner). So the owner's packet (Q | dO) and (O | lse) travels the same way
Q did, and each partial dQ travels straight back to its owner, concurrently.

Communication per call (Qe = B*H*S_local*D elements; e = input, a = accumulation element size):
    forward : P-1 sends + receives of Q (Qe*e), P-1 of (out|lse) (B*H*S_local*(D+1)*a)
    backward: P-1 sends + receives of (Q|dO) (2*Qe*e), of (O|lse) (B*H*S_local*(D+1)*a),
              and of dQ (Qe*a)                    (+1 all_gather of document ids in forward)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshweave.attention.local import accum_dtype
from meshweave.attention.masks import Segment
from meshweave.attention.merge import PartialAccumulator
from meshweave.attention.ring import (
    Plan,
    attend_block,
    attend_block_backward,
    blockwise_autograd,
    ring_plans,
)
from meshweave.attention.ring_comm import next_rank, prev_rank, start_exchange
from meshweave.core.comm import CommGroup
from meshweave.models.attention_api import BatchCache

_ALL = slice(None)


def _pack(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    return torch.cat([out, lse[..., None]], dim=-1)


def _unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return packed[..., :-1], packed[..., -1]


def _tokenring_forward(q, k, v, group: CommGroup, plans: list[Plan], scale: float, backend: str):
    p, acc_dtype = group.size, accum_dtype(q.dtype)
    mine = PartialAccumulator(q, acc_dtype)
    q_cur, done = q, None  # done: packed partial of the previous step, owned by another rank
    for s in range(p):
        sends, recvs = [], []
        if s < p - 1:
            q_next = torch.empty_like(q)
            sends.append((q_cur, next_rank(group)))
            recvs.append((q_next, prev_rank(group)))
        if done is not None:
            back = torch.empty(*q.shape[:-1], q.shape[-1] + 1, dtype=acc_dtype, device=q.device)
            sends.append((done, prev_rank(group, s - 1)))
            recvs.append((back, next_rank(group, s - 1)))
        work = start_exchange(group, sends, recvs)
        part = mine if s == 0 else PartialAccumulator(q, acc_dtype)
        attend_block(q_cur, k, v, plans[s], part, scale, backend)
        work.wait()
        if done is not None:
            _merge_packed(mine, back)
        done = _pack(part.out, part.lse) if s > 0 else None
        if s < p - 1:
            q_cur = q_next
    if done is not None:  # the partial of the last step
        back = torch.empty_like(done)
        start_exchange(group, [(done, prev_rank(group, p - 1))], [(back, next_rank(group, p - 1))]).wait()
        _merge_packed(mine, back)
    return mine.out, mine.lse


def _merge_packed(acc: PartialAccumulator, packed: torch.Tensor) -> None:
    out, lse = _unpack(packed)
    if not bool(torch.isneginf(lse).all()):  # a block where no query saw a key is never merged
        acc.add(_ALL, out, lse)


def _tokenring_backward(dout, q, k, v, out, lse, group: CommGroup, plans: list[Plan], scale: float, backend: str):
    p, acc_dtype = group.size, accum_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
    qdo = torch.stack([q, dout.to(q.dtype)])  # travels with Q
    olse = _pack(out, lse)  # global out | lse of the same queries, accumulation dtype
    dq_done = None
    for s in range(p):
        sends, recvs = [], []
        if s < p - 1:
            qdo_next, olse_next = torch.empty_like(qdo), torch.empty_like(olse)
            sends += [(qdo, next_rank(group)), (olse, next_rank(group))]
            recvs += [(qdo_next, prev_rank(group)), (olse_next, prev_rank(group))]
        if dq_done is not None:
            dq_back = torch.empty_like(dq_done)
            sends.append((dq_done, prev_rank(group, s - 1)))
            recvs.append((dq_back, next_rank(group, s - 1)))
        work = start_exchange(group, sends, recvs)
        dq_part = dq if s == 0 else torch.zeros_like(dq)
        o, l = _unpack(olse)
        attend_block_backward(qdo[1], qdo[0], k, v, o, l, plans[s], dq_part, dk, dv, scale, backend)
        work.wait()
        if dq_done is not None:
            dq += dq_back
        dq_done = dq_part if s > 0 else None
        if s < p - 1:
            qdo, olse = qdo_next, olse_next
    if dq_done is not None:
        dq_back = torch.empty_like(dq_done)
        start_exchange(group, [(dq_done, prev_rank(group, p - 1))], [(dq_back, next_rank(group, p - 1))]).wait()
        dq += dq_back
    return dq, dk, dv


_TokenRingAttention = blockwise_autograd(_tokenring_forward, _tokenring_backward)


def tokenring_attention(
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
    """TokenRing attention of this rank's q (B,H,S,D) over every rank's k, v; returns out (B,H,S,D).

    Same contract as `ring_attention`; communicates as in the module docstring.
    """
    plans = ring_plans("tokenring", group, segments, causal, document_ids, cache)
    return _TokenRingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), group, plans, scale, backend)
