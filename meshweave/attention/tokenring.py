"""TokenRing: K/V stay put; Q travels one way and partial results travel back, concurrently.

Hand-written: the public TokenRing code (ACA-Lab-SJTU/token-ring) is CUDA-only and has no
backward; the backward below is our own design.

Forward, rank r of P (zigzag layout): at step s it holds the queries of rank j = (r + s) mod P (Q
travels r -> r-1) and computes their partial (out, lse) against its own K/V. One batch per step posts,
together, the queries for step s+1 (send to r-1, receive from r+1) and the packed partial (out | lse)
of step s-1 straight back to its owner (send to r+(s-1), receive from r-(s-1)). The owner merges the
partials in a fixed order (fp32, fp64 for fp64).

Reduced send (tokenring_comm.py): only the query rows that some later holder needs travel, and only
the rows a holder's keys can see come back as partials. Under the zigzag causal layout a holder whose
keys all lie after the owner's first chunk needs only the second half of Q; with Q moving r -> r-1 the
route reaches those holders last, so from the wrap on only half of Q (and half a partial) moves.
Rows are chosen by position only, so the sizes are known everywhere without communication.

Backward: the gradient of a (Q_j, KV_r) block needs Q_j, dO_j and the global O_j, lse_j of the
query owner, and contributes dK_r, dV_r (which stay on rank r: no dK/dV traffic at all) and dQ_j
(which goes back to its owner). So the owner's packet (Q | dO) and (O | lse) travels the same way
(and with the same rows) Q did, and each partial dQ travels straight back to its owner, concurrently.

Communication per call (per row of Q: e = input, a = accumulation element size; rows as above):
    forward : P-1 sends + receives of Q rows (B*H*D*e per row), P-1 of (out|lse) (B*H*(D+1)*a per row)
    backward: P-1 sends + receives of (Q|dO) (2*B*H*D*e per row), of (O|lse) (B*H*(D+1)*a per row),
              and of dQ (B*H*D*a per row)          (+1 all_gather of document ids in forward)
    Without a causal mask every message carries all S_local rows; under the zigzag causal layout
    `tokenring_bytes` gives the exact figure (about 3/4 of the full-Q traffic).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshweave.attention.local import accum_dtype
from meshweave.attention.masks import BlockCall, Segment
from meshweave.attention.merge import PartialAccumulator
from meshweave.attention.ring import (
    Plan,
    attend_block,
    attend_block_backward,
    blockwise_autograd,
    cached,
    step_plans,
)
from meshweave.attention.ring_comm import next_rank, prev_rank, start_exchange
from meshweave.attention.tokenring_comm import Route, build_route, relative
from meshweave.core.comm import CommGroup
from meshweave.models.attention_api import BatchCache

def _pack(out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    return torch.cat([out, lse[..., None]], dim=-1)


def _unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return packed[..., :-1], packed[..., -1]


def _rows(x: torch.Tensor, rows: slice, dim: int) -> torch.Tensor:
    return x.narrow(dim, rows.start, rows.stop - rows.start)


def _shifted(call: BlockCall, held: slice, device: torch.device) -> BlockCall:
    """`call` with its query rows counted from the first held row, its dense mask on `device`."""
    mask = call.mask
    if isinstance(mask, torch.Tensor) and mask.device != device:
        mask = mask.to(device, non_blocking=True)
    return BlockCall(relative(call.q_rows, held), call.k_rows, mask, call.batch)


def tokenring_plans(group: CommGroup, segments: Sequence[Sequence[Segment]], causal: bool,
                    document_ids: torch.Tensor | None, cache: BatchCache | None) -> tuple[Route, list[Plan]]:
    """The route and, per step s, the kernel calls for (held rows of Q_{r+s}) x (this rank's keys).

    Host work, once per batch (kept in `cache`). Communicates: one all_gather of document ids over
    `group` (when given), on the first call of a batch.
    """
    def compute() -> tuple[Route, list[Plan]]:
        docs = None
        if document_ids is not None:
            docs = list(group.all_gather(document_ids.contiguous(), dim=0).cpu().chunk(group.size))
        r, p = group.rank, group.size
        route = build_route(segments, causal)
        plans = step_plans(group, lambda s: (r + s) % p, lambda s: r, segments, causal, docs)
        device = document_ids.device if document_ids is not None else torch.device("cpu")
        held = [route.carry[(r + s) % p][s] for s in range(p)]
        return route, [[_shifted(c, held[s], device) for c in plan] for s, plan in enumerate(plans)]

    key = ("tokenring_route", group.name, tuple(group.ranks), tuple(map(tuple, segments)), causal)
    return cached(cache, key, compute)


def _q_exchange(group: CommGroup, route: Route, s: int, held, like: torch.Tensor, dim: int):
    """(sends, recvs, incoming buffer or None) moving the held rows of step s to rank-1 for step s+1."""
    r, sends, recvs, incoming = group.rank, [], [], None
    out_rows = route.rows_sent_q(r, s)
    if out_rows is not None:
        sends.append((_rows(held[0], relative(out_rows, held[1]), dim), prev_rank(group)))
    in_rows = route.rows_received_q(r, s)
    if in_rows is not None:
        shape = list(like.shape)
        shape[dim] = in_rows.stop - in_rows.start
        incoming = torch.empty(shape, dtype=like.dtype, device=like.device)
        recvs.append((incoming, next_rank(group)))
    return sends, recvs, (incoming, in_rows)


def _partial_exchange(group: CommGroup, route: Route, s: int, done, held: slice, like: torch.Tensor, dim: int):
    """(sends, recvs, (buffer, rows)) returning the partial of step s (computed over `held` rows) to
    its owner, and receiving this rank's own partial of step s from its holder."""
    r, sends, recvs = group.rank, [], []
    out_rows = route.rows_partial_sent(r, s)
    if out_rows is not None:  # rows needed here were held here (need is inside carry), so done exists
        sends.append((_rows(done, relative(out_rows, held), dim), next_rank(group, s)))
    in_rows = route.rows_partial_received(r, s)
    back = None
    if in_rows is not None:
        shape = list(like.shape)
        shape[dim] = in_rows.stop - in_rows.start
        back = torch.empty(shape, dtype=like.dtype, device=like.device)
        recvs.append((back, prev_rank(group, s)))
    return sends, recvs, (back, in_rows)


def _tokenring_forward(q, k, v, group: CommGroup, plans, scale: float, backend: str):
    route, steps = plans
    p, acc_dtype = group.size, accum_dtype(q.dtype)
    mine = PartialAccumulator(q, acc_dtype)
    packed_like = torch.empty(*q.shape[:-1], q.shape[-1] + 1, dtype=acc_dtype, device=q.device)
    cur = (q, route.carry[group.rank][0])  # (held queries, which rows of the owner they are)
    done = (None, None)  # (packed partial of the previous step, the owner's rows it covers)
    for s in range(p):
        sends, recvs, incoming = [], [], (None, None)
        if s < p - 1:
            sends, recvs, incoming = _q_exchange(group, route, s, cur, q, dim=2)
        back = (None, None)
        if s >= 2:  # the partial of step s-1 (step 0's stays here)
            ps, pr, back = _partial_exchange(group, route, s - 1, *done, packed_like, dim=2)
            sends, recvs = sends + ps, recvs + pr
        work = start_exchange(group, sends, recvs)
        part = None
        if s == 0:
            attend_block(cur[0], k, v, steps[0], mine, scale, backend)
        elif cur[0] is not None:
            part = PartialAccumulator(cur[0], acc_dtype)
            attend_block(cur[0], k, v, steps[s], part, scale, backend)
        work.wait()
        if back[0] is not None:
            _merge_packed(mine, back[0], back[1])
        done = (_pack(part.out, part.lse), cur[1]) if part is not None else (None, None)
        if s < p - 1:
            cur = incoming
    if p > 1:  # the partial of the last step
        ps, pr, back = _partial_exchange(group, route, p - 1, *done, packed_like, dim=2)
        start_exchange(group, ps, pr).wait()
        if back[0] is not None:
            _merge_packed(mine, back[0], back[1])
    return mine.out, mine.lse


def _merge_packed(acc: PartialAccumulator, packed: torch.Tensor, rows: slice) -> None:
    out, lse = _unpack(packed)
    if not bool(torch.isneginf(lse).all()):  # a block where no query saw a key is never merged
        acc.add(rows, out, lse)


def _tokenring_backward(dout, q, k, v, out, lse, group: CommGroup, plans, scale: float, backend: str):
    route, steps = plans
    p, acc_dtype = group.size, accum_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc_dtype, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc_dtype, device=v.device)
    qdo = torch.stack([q, dout.to(q.dtype)])  # travels with Q
    olse = _pack(out, lse)  # global out | lse of the same queries, accumulation dtype
    held = route.carry[group.rank][0]
    cur_qdo, cur_olse = (qdo, held), (olse, held)
    dq_done = (None, None)  # (partial dQ of the previous step, the owner's rows it covers)
    for s in range(p):
        sends, recvs = [], []
        in_qdo = in_olse = (None, None)
        if s < p - 1:
            s1, r1, in_qdo = _q_exchange(group, route, s, cur_qdo, qdo, dim=3)
            s2, r2, in_olse = _q_exchange(group, route, s, cur_olse, olse, dim=2)
            sends, recvs = s1 + s2, r1 + r2  # (Q|dO) then (O|lse): the same order on every rank
        back = (None, None)
        if s >= 2:
            ps, pr, back = _partial_exchange(group, route, s - 1, *dq_done, dq, dim=2)
            sends, recvs = sends + ps, recvs + pr
        work = start_exchange(group, sends, recvs)
        dq_part = None
        if s == 0:
            dq_part = dq
        elif cur_qdo[0] is not None:
            dq_part = torch.zeros(cur_qdo[0].shape[1:], dtype=acc_dtype, device=q.device)
        if dq_part is not None:
            o, l = _unpack(cur_olse[0])
            attend_block_backward(cur_qdo[0][1], cur_qdo[0][0], k, v, o, l, steps[s], dq_part, dk, dv, scale, backend)
        work.wait()
        if back[0] is not None:
            dq[:, :, back[1]] += back[0]
        dq_done = (dq_part, cur_qdo[1]) if dq_part is not None else (None, None)
        if s < p - 1:
            cur_qdo, cur_olse = in_qdo, in_olse
    if p > 1:
        ps, pr, back = _partial_exchange(group, route, p - 1, *dq_done, dq, dim=2)
        start_exchange(group, ps, pr).wait()
        if back[0] is not None:
            dq[:, :, back[1]] += back[0]
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
    plans = tokenring_plans(group, segments, causal, document_ids, cache)
    return _TokenRingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), group, plans, scale, backend)
