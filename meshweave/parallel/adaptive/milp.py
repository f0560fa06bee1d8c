"""FlexSP's MILP for one micro-batch (§8.3, `solve_flexSP_bucket_seqs`), solved by scipy's HiGHS.

Candidate groups p: each power-of-two size s, repeated up to N/s times. Variables: A[k, p] ∈ ℤ≥0, the
sequences of bucket k in group p; m[p] ∈ {0, 1}, group p used; M ≥ 0, the makespan. Minimise M subject to
  1. Σ_p A[k, p] = |bucket k|                           every sequence placed once
  2. A[k, p] = 0 when s_p < minSP(k)                     (those variables are simply not created)
  3. Σ_k ceil(L_k / s_p) · A[k, p] ≤ cap · m[p]          memory per rank (also links A to m)
  4. Σ_k T(L_k, s_p) · A[k, p] + β · m[p] ≤ M            time of every group ≤ makespan
  5. m[p] ≤ Σ_k A[k, p]                                 a used group has a sequence (an unused one has
                                                         none by 3: every sequence takes a token per rank)
  6. Σ_p s_p · m[p] = N                                  every rank in exactly one group
Symmetry: copies of one size are interchangeable, so copy p+1 is used only if copy p is, and carries no
more time. Copies are pruned where no plan can use them: at most N/s, at most the sequences that may run on
s (each used group holds one), and at most (N − R_t)/s where R_t are the ranks that sequences needing t > s
ranks must occupy (a valid form of FlexSP's s_max·cnt_max prune, which assumes those sequences never share a
group). scipy's milp takes no start solution, so the greedy plan enters as a cut-off, M ≤ its makespan at
the bucket lengths, and the lower bound of `Problem.lower_bound` bounds M from below.

The solver works on buckets; `expand` then hands out the bucket's actual sequences, longest first, each to
the group of that bucket with the most time left, which keeps every group within the MILP's bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from meshweave.parallel.adaptive.buckets import Bucket, bucket_lengths
from meshweave.parallel.adaptive.cost import min_group_size
from meshweave.parallel.adaptive.plan import Draft
from meshweave.parallel.adaptive.problem import Problem

# Wall time around the search, measured on the (loaded) 2-core machine this was written on: scipy's wrapper
# converts the model before HiGHS's clock starts (~1 ms + 3 µs per variable). HiGHS's presolve looks at the
# clock only when it ends: 50 ms on a 650-variable model whatever the limit, so it is off (the searches
# found the same plans without it); the search itself stops within a few ms of its limit. A budget too small
# to start gets no solve at all rather than an overrun.
WRAPPER_S, WRAPPER_S_PER_VARIABLE = 0.001, 3e-6
START_S, START_S_PER_VARIABLE = 0.003, 3e-6


@dataclass(frozen=True)
class MilpResult:
    status: str                    # "optimal" | "timeout" (incumbent) | "no-solution" | "infeasible"
    drafts: list[Draft] | None     # the groups, None without a solution
    makespan: float | None         # the solver's M in seconds (at the bucket lengths)
    message: str = ""


@dataclass(frozen=True)
class _Candidate:
    size: int
    copy: int                      # 0, 1, ... among the candidates of this size
    buckets: tuple[int, ...]       # buckets allowed on this group (constraint 2)


def solve_microbatch(p: Problem, chunk: Sequence[int], cutoff_drafts: Sequence[Draft] | None, *,
                     time_limit_s: float, mip_gap: float) -> MilpResult:
    """Solve one micro-batch's MILP; `cutoff_drafts` (a greedy plan) bounds the makespan from above."""
    buckets = bucket_lengths([p.lengths[i] for i in chunk], p.n_ranks * p.capacity)
    buckets = [Bucket(b.boundary, tuple(chunk[j] for j in b.members)) for b in buckets]
    cands = _candidates(p, buckets)
    n_var = sum(len(c.buckets) for c in cands) + len(cands) + 1
    highs_s = time_limit_s - WRAPPER_S - WRAPPER_S_PER_VARIABLE * n_var
    if highs_s < START_S + START_S_PER_VARIABLE * n_var:
        return MilpResult("no-solution", None, None, f"Time limit reached before the solve: {time_limit_s * 1e3:.1f} "
                                                    f"ms is too little to start a MILP of {n_var} variables")
    cutoff = _bucketed_makespan(p, buckets, cutoff_drafts) if cutoff_drafts else None
    lower = p.lower_bound(chunk)
    scale = cutoff or lower or 1.0
    model = _Model(p, buckets, cands, scale)
    res = milp(model.objective(), integrality=model.integrality(), bounds=model.bounds(lower, cutoff),
               constraints=model.constraints(), options={"time_limit": highs_s,
                                                         "mip_rel_gap": mip_gap, "presolve": False})
    if res.x is None:
        status = "infeasible" if res.status == 2 else "no-solution"
        return MilpResult(status, None, None, str(res.message))
    drafts = model.expand(res.x)
    status = "optimal" if res.status == 0 else "timeout"
    return MilpResult(status, drafts, float(res.x[-1]) * scale, str(res.message))


def _bucketed_makespan(p: Problem, buckets: list[Bucket], drafts: Sequence[Draft]) -> float:
    boundary = {i: b.boundary for b in buckets for i in b.members}
    return max(p.cost.group_time([boundary[i] for i in seqs], size) for size, seqs in drafts)


def _candidates(p: Problem, buckets: list[Bucket]) -> list[_Candidate]:
    need = [min_group_size(b.boundary, p.capacity) for b in buckets]
    out = []
    for s in sorted(p.sizes, reverse=True):
        allowed = tuple(k for k, b in enumerate(buckets) if need[k] <= s)
        for c in range(_copies(p, buckets, need, s, allowed)):
            out.append(_Candidate(s, c, allowed))
    return out


def _copies(p: Problem, buckets: list[Bucket], need: list[int], s: int, allowed: tuple[int, ...]) -> int:
    copies = min(p.n_ranks // s, sum(len(buckets[k].members) for k in allowed))
    for t in p.sizes:
        if t > s:
            tokens = sum(b.boundary * len(b.members) for k, b in enumerate(buckets) if need[k] >= t)
            reserved = t * -(-tokens // (t * p.capacity)) if tokens else 0
            copies = min(copies, max(0, p.n_ranks - reserved) // s)
    return copies


class _Model:
    """The MILP's arrays. Variables: A (one per candidate and allowed bucket, candidate-major), m (one per
    candidate), M (last). Built with numpy index arithmetic: a Python row-by-row build cost more than the
    solve at 500 sequences."""

    def __init__(self, p: Problem, buckets: list[Bucket], cands: list[_Candidate], scale: float) -> None:
        self.p, self.buckets, self.cands, self.scale = p, buckets, cands, scale
        self.a_cand = np.array([q for q, c in enumerate(cands) for _ in c.buckets], dtype=np.int64)
        self.a_bucket = np.array([k for c in cands for k in c.buckets], dtype=np.int64)
        n_a, n_c = len(self.a_cand), len(cands)
        self.m0, self.n_var = n_a, n_a + n_c + 1
        self.size = np.array([c.size for c in cands], dtype=np.int64)
        bound = np.array([b.boundary for b in buckets], dtype=np.int64)
        count = np.array([len(b.members) for b in buckets], dtype=np.int64)
        sizes = self.size[self.a_cand]
        self.mem = -(-bound[self.a_bucket] // sizes)                     # tokens per rank, ceil(L / s)
        times = {s: p.cost.seq_times(bound, s) / scale for s in sorted(set(self.size.tolist()))}
        self.time = np.array([times[s][k] for s, k in zip(sizes.tolist(), self.a_bucket.tolist())])
        self.a_max = np.minimum(count[self.a_bucket], p.capacity // self.mem)
        self.count = count

    def objective(self) -> np.ndarray:
        c = np.zeros(self.n_var)
        c[-1] = 1.0
        return c

    def integrality(self) -> np.ndarray:
        kinds = np.ones(self.n_var)
        kinds[-1] = 0
        return kinds

    def bounds(self, lower: float, cutoff: float | None) -> Bounds:
        lo, hi = np.zeros(self.n_var), np.ones(self.n_var)
        hi[:self.m0] = self.a_max
        lo[-1] = lower / self.scale
        hi[-1] = np.inf if cutoff is None else cutoff / self.scale * (1 + 1e-9)
        return Bounds(lo, hi)

    def constraints(self) -> list[LinearConstraint]:
        """Rows 1, 3, 4, 5 (m ≤ Σ A; Σ A ≤ U·m is implied by 3, every sequence taking >= 1 token per rank),
        6 and the symmetry rows, stacked into one sparse matrix."""
        n_a, n_c = self.m0, len(self.cands)
        a_idx, m_idx, big_m = np.arange(n_a), self.m0 + np.arange(n_c), self.n_var - 1
        beta = self.p.cost.beta / self.scale
        blocks = [
            # 1. every sequence placed once:           Σ_p A[k,p] = |bucket k|
            (self.a_bucket, a_idx, np.ones(n_a), self.count, self.count),
            # 3. memory:                               Σ_k need·A[k,p] − cap·m[p] ≤ 0
            (*_stack((self.a_cand, a_idx, self.mem), (np.arange(n_c), m_idx, -self.p.capacity)),
             np.full(n_c, -np.inf), np.zeros(n_c)),
            # 4. time:                                 Σ_k T·A[k,p] + β·m[p] − M ≤ 0
            (*_stack((self.a_cand, a_idx, self.time), (np.arange(n_c), m_idx, beta),
                     (np.arange(n_c), np.full(n_c, big_m), -1.0)), np.full(n_c, -np.inf), np.zeros(n_c)),
            # 5. a used group holds a sequence:        Σ_k A[k,p] − m[p] ≥ 0
            (*_stack((self.a_cand, a_idx, 1.0), (np.arange(n_c), m_idx, -1.0)), np.zeros(n_c),
             np.full(n_c, np.inf)),
            # 6. every rank in one group:              Σ_p s_p·m[p] = N
            (np.zeros(n_c, dtype=np.int64), m_idx, self.size.astype(np.float64), [self.p.n_ranks],
             [self.p.n_ranks]),
        ]
        blocks += self._symmetry(beta)
        return [_constraint(blocks, self.n_var)]

    def _symmetry(self, beta: float) -> list[tuple]:
        """Copy q+1 of a size is used only after copy q (m[q] ≥ m[q+1]) and carries no more time."""
        pairs = np.array([q for q in range(len(self.cands) - 1) if self.cands[q].size == self.cands[q + 1].size],
                         dtype=np.int64)
        if not len(pairs):
            return []
        n = len(pairs)
        row_of = np.full(len(self.cands), -1, dtype=np.int64)
        row_of[pairs] = np.arange(n)
        first = row_of[self.a_cand] >= 0                  # A of copy q: +time
        second_row = np.full(len(self.cands), -1, dtype=np.int64)
        second_row[pairs + 1] = np.arange(n)
        second = second_row[self.a_cand] >= 0             # A of copy q+1: −time
        a_idx, m_q, m_next = np.arange(self.m0), self.m0 + pairs, self.m0 + pairs + 1
        used = (np.arange(n), m_q, 1.0), (np.arange(n), m_next, -1.0)
        load = ((row_of[self.a_cand][first], a_idx[first], self.time[first]),
                (second_row[self.a_cand][second], a_idx[second], -self.time[second]),
                (np.arange(n), m_q, beta), (np.arange(n), m_next, -beta))
        return [(*_stack(*used), np.zeros(n), np.full(n, np.inf)),
                (*_stack(*load), np.zeros(n), np.full(n, np.inf))]

    def expand(self, x: np.ndarray) -> list[Draft]:
        """Concrete groups: each bucket's sequences, longest first, to its group with the most time left."""
        counts = np.rint(x).astype(np.int64)
        used = [q for q in range(len(self.cands)) if counts[self.m0 + q] == 1]
        load = {q: self.p.cost.beta for q in used}
        seqs: dict[int, list[int]] = {q: [] for q in used}
        slots: dict[int, dict[int, int]] = {k: {} for k in range(len(self.buckets))}
        for v in np.flatnonzero(counts[:self.m0] > 0).tolist():
            slots[int(self.a_bucket[v])][int(self.a_cand[v])] = int(counts[v])
        for k, b in enumerate(self.buckets):
            for i in b.members:                                    # members are longest first
                q = min((c for c, n in slots[k].items() if n > 0), key=lambda c: (load[c], c))
                slots[k][q] -= 1
                seqs[q].append(i)
                load[q] += self.p.times[self.cands[q].size][i]
        return [(self.cands[q].size, tuple(seqs[q])) for q in used]


def _stack(*parts: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, values) of several pieces of one block; a scalar value is broadcast over its piece."""
    rows = np.concatenate([np.asarray(r, dtype=np.int64) for r, _, _ in parts])
    cols = np.concatenate([np.asarray(c, dtype=np.int64) for _, c, _ in parts])
    vals = np.concatenate([np.broadcast_to(np.asarray(v, dtype=np.float64), np.shape(c)) for _, c, v in parts])
    return rows, cols, vals


def _constraint(blocks: list[tuple], n_var: int) -> LinearConstraint:
    """One LinearConstraint from blocks of (rows, cols, values, lower, upper), rows numbered inside a block."""
    rows, cols, vals, lo, hi, offset = [], [], [], [], [], 0
    for r, c, v, low, high in blocks:
        rows.append(np.asarray(r, dtype=np.int64) + offset)
        cols.append(np.asarray(c, dtype=np.int64))
        vals.append(np.asarray(v, dtype=np.float64))
        lo.append(np.asarray(low, dtype=np.float64))
        hi.append(np.asarray(high, dtype=np.float64))
        offset += len(lo[-1])
    matrix = csr_array((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(offset, n_var))
    return LinearConstraint(matrix, np.concatenate(lo), np.concatenate(hi))
