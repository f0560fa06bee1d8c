"""LASP-2: linear attention over a sequence split across the ranks of an SP group.

Each rank holds one or more *segments* (runs of consecutive global positions) of every sequence, in the
layout of the configured softmax method (contiguous for ulysses, zigzag chunks i and 2P-1-i for ring,
tokenring and allgather, usp's pieces). Linear attention is a linear recurrence over positions, so over segments in global
order it is S_t = a_t S_{t-1} + M_t, where M_t = (K_t * kd)^T V_t is what segment t adds to the state at its
end, and a_t = lambda^len_t * [segment t is one document run] * [it continues the run that ended t-1]
resets the state at document boundaries, also across shards. A rank's outputs are its segments' own
(chunked, single-process) linear attention plus (Q_t * qd) E_t, with E_t = cont_t S_{t-1} the state carried
in from every earlier segment (of any rank).

Communication per layer (all sizes independent of the sequence length):
    forward : one all_gather of this rank's memory states, n_seg x B x H x Dk x Dv values in fp32
              (n_seg = segments per rank: 1 contiguous, 2 zigzag; twice that bidirectional: states in both
              directions travel in the same call); every rank then takes the exclusive prefix (suffix) in
              global segment order locally. The gather is started first and the intra-segment work runs
              while it is in flight.
    backward: one all_gather of dE_t = (Q_t * qd)^T dO_t (same size), overlapped with the local backward;
              each rank then takes the suffix (prefix) sums dM_j = sum_t d E_t / d M_j for its own segments.
    per batch, with document ids: one all_gather of each segment's first/last id (cached in meta.cache).

The exchange of states is a strategy: `AllGatherStates` (LASP-2) here, the P-1 sequential hops of LASP-1 in
lasp1.py; the math (meshweave.models.linear_attention) is shared. Load balance: a causal segment costs the
same in every position, so LASP-2 needs no zigzag; it follows whatever layout the softmax layers need.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import torch

from meshweave.attention.lasp2_comm import gather_boundaries, start_all_gather
from meshweave.attention.layout import shard_segments
from meshweave.attention.masks import Segment
from meshweave.core.comm import CommGroup, single_process_group
from meshweave.models.attention_api import AttentionMeta, BatchCache
from meshweave.models.linear_attention import (
    DEFAULT_CHUNK,
    carried_output,
    carried_output_backward,
    document_runs,
    heads_first,
    incoming_states,
    incoming_states_backward,
    local_backward,
    local_forward,
    segment_state,
    segment_state_backward,
    segment_weights,
)

FORWARD, BACKWARD = 0, 1  # directions: left to right (causal) and right to left (the bidirectional extra)


@lru_cache(maxsize=64)
def segment_layout(method: str, seq_len: int, size: int, ulysses_degree: int | None) -> tuple[tuple[Segment, ...], ...]:
    """Every SP rank's segments (global runs, local order) in `method`'s layout."""
    return tuple(tuple(shard_segments(method, seq_len, size, r, ulysses_degree)) for r in range(size))


@dataclass(frozen=True)
class BatchPlan:
    """What every layer of one batch shares: the layout, local run ids, every segment's boundary facts."""

    layout: tuple[tuple[Segment, ...], ...]  # by SP rank
    rank: int
    runs: tuple[torch.Tensor | None, ...]  # this rank's segments: (B, len) document-run ids, or None
    boundaries: torch.Tensor | None  # (P, n_max, B, 3): first id, last id, one run? — None without documents

    @property
    def n_max(self) -> int:
        return max(len(segs) for segs in self.layout)

    @property
    def local(self) -> tuple[Segment, ...]:
        return self.layout[self.rank]


def make_plan(group: CommGroup, layout: tuple[tuple[Segment, ...], ...], rank: int,
              document_ids: torch.Tensor | None) -> BatchPlan:
    """Run ids of this rank's segments and, with documents, every segment's boundary facts.

    Communicates: with document ids, one all_gather of (n_max, B, 3) ids over `group`; nothing otherwise.
    """
    if document_ids is None:
        return BatchPlan(layout, rank, tuple(None for _ in layout[rank]), None)
    runs, facts, offset = [], [], 0
    for seg in layout[rank]:
        ids = document_ids[:, offset : offset + seg.length]
        offset += seg.length
        r = document_runs(ids)
        runs.append(r)
        facts.append(torch.stack([ids[:, 0].long(), ids[:, -1].long(), (r[:, -1] == 0).long()], dim=-1))
    n_max = max(len(segs) for segs in layout)
    facts += [torch.zeros_like(facts[0])] * (n_max - len(facts))
    return BatchPlan(layout, rank, tuple(runs), gather_boundaries(group, torch.stack(facts)))


@dataclass(frozen=True)
class Chain:
    """The recurrence over every segment of the group in one direction's global order."""

    order: list[tuple[int, int]]  # (rank, local segment index), first to last
    a: torch.Tensor  # (B|1, H|1, T): alpha_t * cont_t
    cont: torch.Tensor  # (B|1, 1, T)
    positions: list[int]  # where this rank's segments sit in `order`


def make_chain(plan: BatchPlan, direction: int, log_decay: torch.Tensor | None, dtype: torch.dtype,
               device: torch.device) -> Chain:
    """Coefficients of the segment recurrence (no communication: the boundary facts are already gathered)."""
    segs = [(seg.start, r, i) for r, local in enumerate(plan.layout) for i, seg in enumerate(local)]
    segs.sort(reverse=direction == BACKWARD)
    order = [(r, i) for _, r, i in segs]
    lengths = torch.tensor([plan.layout[r][i].length for r, i in order], dtype=dtype, device=device)
    t = len(order)
    alpha = torch.ones(1, 1, t, dtype=dtype, device=device)
    if log_decay is not None:
        alpha = torch.exp(log_decay.to(dtype)[None, :, None] * lengths)
    cont = torch.ones(1, 1, t, dtype=dtype, device=device)
    if plan.boundaries is not None:
        facts = plan.boundaries[[r for r, _ in order], [i for _, i in order]]  # (T, B, 3)
        first, last = (facts[..., 1], facts[..., 0]) if direction == BACKWARD else (facts[..., 0], facts[..., 1])
        same = (first[1:] == last[:-1]).to(dtype)  # (T-1, B)
        cont = torch.cat([torch.ones_like(first[:1], dtype=dtype), same]).T[:, None]
        alpha = alpha * facts[..., 2].to(dtype).T[:, None]
    cont = cont.clone()
    cont[..., 0] = 0
    positions = [order.index((plan.rank, i)) for i in range(len(plan.local))]
    return Chain(order, alpha * cont, cont, positions)


class StateExchange(Protocol):
    """How the per-segment states reach the segments after them (LASP-2: all-gather; LASP-1: a chain)."""

    def start(self, states: torch.Tensor) -> Any:
        """Begin sending this rank's states (n_dir, n_max, B, H, Dk, Dv)."""

    def incoming(self, pending: Any, chains: list[Chain]) -> torch.Tensor:
        """E for this rank's segments, (n_dir, n_max, B, H, Dk, Dv)."""

    def start_backward(self, grads: torch.Tensor) -> Any:
        """Begin sending this rank's dE (n_dir, n_max, B, H, Dk, Dv)."""

    def state_grads(self, pending: Any, chains: list[Chain]) -> torch.Tensor:
        """dM for this rank's segments, (n_dir, n_max, B, H, Dk, Dv)."""


class AllGatherStates:
    """LASP-2's exchange: one all-gather each way, prefix (forward) and suffix (backward) sums taken locally."""

    def __init__(self, group: CommGroup) -> None:
        self.group = group

    def start(self, states: torch.Tensor):
        return start_all_gather(self.group, states)

    def incoming(self, pending, chains: list[Chain]) -> torch.Tensor:
        return self._map(pending.wait(), chains, incoming_states)

    def start_backward(self, grads: torch.Tensor):
        return start_all_gather(self.group, grads)

    def state_grads(self, pending, chains: list[Chain]) -> torch.Tensor:
        return self._map(pending.wait(), chains, incoming_states_backward)

    @staticmethod
    def _map(gathered: torch.Tensor, chains: list[Chain], fn) -> torch.Tensor:
        """Apply fn(a, cont, x) along each direction's global order; keep this rank's segments.
        gathered: (P, n_dir, n_max, B, H, Dk, Dv)."""
        out = torch.zeros_like(gathered[0])
        for d, chain in enumerate(chains):
            ranks, idx = [r for r, _ in chain.order], [i for _, i in chain.order]
            ordered = gathered[ranks, d, idx].movedim(0, 2)  # (B, H, T, Dk, Dv)
            result = fn(chain.a, chain.cont, ordered)
            for s, t in enumerate(chain.positions):
                out[d, s] = result[:, :, t]
        return out


def _views(x: torch.Tensor, segments: tuple[Segment, ...], direction: int) -> list[torch.Tensor]:
    """Per segment, along dim 2 (heads-first tensors), reversed for the backward direction."""
    parts = list(x.split([s.length for s in segments], dim=2))
    return [p.flip(2) for p in parts] if direction == BACKWARD else parts


class _SegmentedLinearAttention(torch.autograd.Function):
    """This rank's segments of linear attention over the whole group: local chunked kernel + carried states."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, plan: BatchPlan, exchange: StateExchange, causal: bool, chunk: int):
        dirs = (FORWARD,) if causal else (FORWARD, BACKWARD)
        segs, dt, dev = plan.local, q.dtype, q.device
        weights = _edge_weights(plan, dirs, log_decay, dt, dev)
        states = q.new_zeros(len(dirs), plan.n_max, q.shape[0], q.shape[1], k.shape[-1], v.shape[-1])
        for d in dirs:
            for s, (kk, vv) in enumerate(zip(_views(k, segs, d), _views(v, segs, d))):
                states[d, s] = segment_state(kk, vv, weights[d][s][1])
        pending = exchange.start(states)  # in flight during the local work
        outs = [local_forward(qq, kk, vv, log_decay, runs, causal, chunk)
                for qq, kk, vv, runs in zip(*(x.split([s.length for s in segs], dim=2) for x in (q, k, v)), plan.runs)]
        chains = [make_chain(plan, d, log_decay, dt, dev) for d in dirs]
        incoming = exchange.incoming(pending, chains)
        for d in dirs:
            for s, qq in enumerate(_views(q, segs, d)):
                extra = carried_output(qq, weights[d][s][0], incoming[d, s])
                outs[s] = outs[s] + (extra.flip(2) if d == BACKWARD else extra)
        ctx.save_for_backward(q, k, v, incoming)
        ctx.extra = (log_decay, plan, exchange, causal, chunk, dirs, weights, chains)
        return torch.cat(outs, dim=2)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, incoming = ctx.saved_tensors
        log_decay, plan, exchange, causal, chunk, dirs, weights, chains = ctx.extra
        segs, grad_out = plan.local, grad_out.contiguous()
        dq_carried = [torch.zeros_like(x) for x in q.split([s.length for s in segs], dim=2)]
        grad_incoming = torch.zeros_like(incoming)
        for d in dirs:
            for s, (qq, gg) in enumerate(zip(_views(q, segs, d), _views(grad_out, segs, d))):
                dq, grad_incoming[d, s] = carried_output_backward(qq, weights[d][s][0], incoming[d, s], gg)
                dq_carried[s] += dq.flip(2) if d == BACKWARD else dq
        pending = exchange.start_backward(grad_incoming)  # in flight during the local backward
        split = [x.split([s.length for s in segs], dim=2) for x in (q, k, v, grad_out)]
        grads = [list(local_backward(qq, kk, vv, gg, log_decay, runs, causal, chunk))
                 for qq, kk, vv, gg, runs in zip(*split, plan.runs)]
        grad_states = exchange.state_grads(pending, chains)
        for d in dirs:
            for s, (kk, vv) in enumerate(zip(_views(k, segs, d), _views(v, segs, d))):
                dk, dv = segment_state_backward(kk, vv, weights[d][s][1], grad_states[d, s])
                grads[s][1] += dk.flip(2) if d == BACKWARD else dk
                grads[s][2] += dv.flip(2) if d == BACKWARD else dv
        dq = torch.cat([g[0] + c for g, c in zip(grads, dq_carried)], dim=2)
        dk, dv = (torch.cat([g[i] for g in grads], dim=2) for i in (1, 2))
        return dq, dk, dv, None, None, None, None, None


def _edge_weights(plan: BatchPlan, dirs, log_decay, dtype, device) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """(qd, kd) of each local segment, per direction (in that direction's token order)."""
    out = []
    for d in dirs:
        per_seg = []
        for seg, runs in zip(plan.local, plan.runs):
            r = runs.flip(1) if (runs is not None and d == BACKWARD) else runs
            qd, kd, _ = segment_weights(r, log_decay, seg.length, dtype, device)
            per_seg.append((qd, kd))
        out.append(per_seg)
    return out


def _plan_for(cache: BatchCache | None, key: tuple, compute) -> BatchPlan:
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


class LinearSequenceParallel:
    """The op of "linear" slots over an SP group: LASP-2 by default (another `StateExchange` gives LASP-1).

    `method` names the layout the batch is sharded with ("local"/"ulysses": contiguous, "ring"/"tokenring"/
    "allgather": zigzag, "usp" with `ulysses_degree`); the group's ranks are listed in layout order (group rank r holds
    the layout's shard r, as the mesh's "sp" group does for every method). Call as op(q, k, v, meta, log_decay) with this rank's
    shard of q (B, S_local, H, Dk), k (B, S_local, H_kv, Dk), v (B, S_local, H_kv, Dv) (feature map applied);
    returns this rank's shard of the output (B, S_local, H, Dv) in q's dtype.
    """

    def __init__(self, group: CommGroup | None = None, method: str = "ulysses", ulysses_degree: int | None = None,
                 chunk: int = DEFAULT_CHUNK, exchange: StateExchange | None = None) -> None:
        self.group = group if group is not None else single_process_group("sp")
        self.method, self.ulysses_degree, self.chunk = method, ulysses_degree, chunk
        self.exchange = exchange if exchange is not None else AllGatherStates(self.group)

    def plan(self, seq_len: int, meta: AttentionMeta) -> BatchPlan:
        """The batch's plan (made by the first layer, reused by the others through meta.cache)."""
        layout = segment_layout(self.method, seq_len, self.group.size, self.ulysses_degree)
        key = ("linear_sp", self.group.name, tuple(self.group.ranks), self.method, seq_len)
        return _plan_for(meta.cache, key, lambda: make_plan(self.group, layout, self.group.rank, meta.document_ids))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta,
                 log_decay: torch.Tensor | None = None) -> torch.Tensor:
        out_dtype = q.dtype
        plan = self.plan(q.shape[1] * self.group.size, meta)
        q, k, v, log_decay = heads_first(q, k, v, log_decay)
        out = _SegmentedLinearAttention.apply(q, k, v, log_decay, plan, self.exchange, meta.causal, self.chunk)
        return out.transpose(1, 2).to(out_dtype)


def lasp2_for_layout(group: CommGroup, layout_op: Any, chunk: int = DEFAULT_CHUNK) -> LinearSequenceParallel:
    """LASP-2 over `group` in the layout of the softmax op `layout_op` (.method, .sp_rank, .sp_size, .ulysses_degree)."""
    if (layout_op.sp_size, layout_op.sp_rank) != (group.size, group.rank):
        raise ValueError(f"LASP-2 group '{group.name}' (rank {group.rank} of {group.size}) does not list its ranks in "
                         f"the layout's order (shard {layout_op.sp_rank} of {layout_op.sp_size})")
    return LinearSequenceParallel(group, layout_op.method, layout_op.ulysses_degree, chunk)
