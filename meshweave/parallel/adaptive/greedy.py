"""Greedy planners: the peers the MILP is compared with, and its cut-off and fallback.

- `homogeneous`: one micro-batch on N/s groups of one size s, sequences longest first to the least-loaded
  group with memory room (LPT). Over a step with one s this is a static SP degree; FlexSP warm-starts its
  MILP with these (`generate_balanced_initial_solution`).
- `heterogeneous`: each sequence (longest first) gets the smallest group that brings it under a target
  makespan (the micro-batch's lower bound), while ranks are free; the rest join the group where they finish
  earliest; leftover ranks then double the busiest groups.
- `best_greedy`: the better of all the above for one micro-batch (the MILP's cut-off and its fallback).
- `megatron_microbatches`: Megatron-LM's hybrid-CP rule (`BalancedCPScheduler` in
  megatron/core/pipeline_parallel/hybrid_cp_schedule.py), re-implemented from its description: every
  sequence on 2^ceil(log2(L / max_seqlen_per_rank)) ranks, workload L²/cp, least-loaded group of that size
  or a fresh group while ranks are free; a micro-batch closes when nothing more fits or (once the sizes
  fall) when the ranks' workloads are within 5%; the most loaded group sheds its last sequence while that
  helps balance; empty ranks double the smallest group. It does its own micro-batching. Memory per micro-
  batch (FlexSP's runtime keeps a micro-batch's sequences resident) is added to its placement test.

Hand-written: these are the scheduling rules under comparison, not library algorithms.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from meshweave.parallel.adaptive.plan import Draft
from meshweave.parallel.adaptive.problem import Problem

MEGATRON_BALANCE_SLACK = 0.05  # Megatron's `delta`


@dataclass(eq=False, slots=True)  # identity, not field, equality: groups are compared and looked up often
class _Group:
    size: int
    order: int = 0             # creation order, the tie-break everywhere
    seqs: list[int] = field(default_factory=list)
    load: float = 0.0          # seconds (no β) under the planner's cost model
    mem: int = 0               # tokens per rank
    work: float = 0.0          # Megatron's workload estimate, Σ L²/cp

    def add(self, p: Problem, i: int) -> None:
        self.seqs.append(i)
        self.load += p.times[self.size][i]
        self.mem += p.tokens[self.size][i]
        self.work += p.lengths[i] * p.lengths[i] / self.size

    def remove_last(self, p: Problem) -> int:
        i = self.seqs.pop()
        self.load -= p.times[self.size][i]
        self.mem -= p.tokens[self.size][i]
        self.work -= p.lengths[i] * p.lengths[i] / self.size
        return i

    def resize(self, p: Problem, size: int) -> None:
        seqs, self.seqs, self.size = self.seqs, [], size
        self.load, self.mem, self.work = 0.0, 0, 0.0
        for i in seqs:
            self.add(p, i)

    def fits(self, p: Problem, i: int) -> bool:
        return self.mem + p.tokens[self.size][i] <= p.capacity

    def draft(self) -> Draft:
        return (self.size, tuple(self.seqs))


def longest_first(p: Problem, chunk: Sequence[int]) -> list[int]:
    return sorted(chunk, key=lambda i: (-p.lengths[i], i))


def makespan(p: Problem, drafts: Sequence[Draft]) -> float:
    """Slowest group's seconds, β included (the same sum as plan.draft_makespan, from the priced table)."""
    return max(sum(p.times[size][i] for i in seqs) for size, seqs in drafts) + p.cost.beta


def homogeneous(p: Problem, chunk: Sequence[int], size: int) -> list[Draft] | None:
    """LPT onto N/size groups of `size`; None if a sequence cannot fit or a group would stay empty."""
    n_groups = p.n_ranks // size
    if len(chunk) < n_groups or any(p.min_size[i] > size for i in chunk):
        return None
    groups = [_Group(size, g) for g in range(n_groups)]
    heap = [(0.0, 0, g) for g in range(n_groups)]   # (load, sequences, group): ties go to emptier, then lower
    for i in longest_first(p, chunk):
        skipped = []
        while heap and not groups[heap[0][2]].fits(p, i):
            skipped.append(heapq.heappop(heap))
        if not heap:
            return None
        _, _, g = heapq.heappop(heap)
        groups[g].add(p, i)
        heapq.heappush(heap, (groups[g].load, len(groups[g].seqs), g))
        for item in skipped:
            heapq.heappush(heap, item)
    if any(not g.seqs for g in groups):
        return None
    return [g.draft() for g in groups]


def heterogeneous(p: Problem, chunk: Sequence[int]) -> list[Draft] | None:
    """Target-driven sizes while ranks are free, earliest-finish joins after; None if something cannot fit."""
    target = p.lower_bound(chunk) - p.cost.beta
    pool = _Pool(p)
    free = p.n_ranks
    for i in longest_first(p, chunk):
        size = _size_for_target(p, i, target)
        if size > free:
            size = max((s for s in p.sizes if p.min_size[i] <= s <= free), default=0)
        best = pool.earliest(i)
        if size and (best is None or best.load + p.times[best.size][i] > p.times[size][i]):
            pool.open(size, i)                  # a fresh group finishes it sooner than any existing one
            free -= size
        elif best is not None:
            pool.add(best, i)
        else:
            return None
    if not _fill_free_ranks(p, pool.groups, free):
        return None
    return [g.draft() for g in pool.groups]


def _size_for_target(p: Problem, i: int, target: float) -> int:
    """Smallest allowed size that brings sequence i under the target, else the largest allowed size."""
    for s in p.sizes:
        if s >= p.min_size[i] and p.times[s][i] <= target:
            return s
    return p.max_size


class _Pool:
    """Groups with one lazy heap of (load, order) per size: the earliest-finishing group for a sequence in
    O(sizes · log groups) instead of a scan of every group."""

    def __init__(self, p: Problem) -> None:
        self.p = p
        self.groups: list[_Group] = []
        self.heaps: dict[int, list[tuple[float, int]]] = {s: [] for s in p.sizes}

    def open(self, size: int, i: int) -> None:
        g = _Group(size, len(self.groups))
        self.groups.append(g)
        self.add(g, i)

    def add(self, g: _Group, i: int) -> None:
        g.add(self.p, i)
        heapq.heappush(self.heaps[g.size], (g.load, g.order))  # the old entry goes stale

    def earliest(self, i: int) -> _Group | None:
        best, best_key = None, None
        for s in self.p.sizes:
            if s < self.p.min_size[i]:
                continue
            g = self._least_loaded_fitting(s, i)
            if g is not None and (best_key is None or (g.load + self.p.times[s][i], g.order) < best_key):
                best, best_key = g, (g.load + self.p.times[s][i], g.order)
        return best

    def _least_loaded_fitting(self, size: int, i: int) -> _Group | None:
        heap, skipped, found = self.heaps[size], [], None
        while heap:
            load, order = heap[0]
            g = self.groups[order]
            if g.load != load:
                heapq.heappop(heap)             # stale
            elif not g.fits(self.p, i):
                skipped.append(heapq.heappop(heap))
            else:
                found = g
                break
        for item in skipped:
            heapq.heappush(heap, item)
        return found


def _fill_free_ranks(p: Problem, groups: list[_Group], free: int) -> bool:
    """Give every free rank work: double the busiest group that fits, else split a group's shortest sequence
    off onto a new group. False if neither is possible (too few sequences for the ranks)."""
    while free > 0:
        grow = [g for g in groups if g.size <= free and 2 * g.size <= p.max_size]
        if grow:
            g = max(grow, key=lambda g: (g.load, -g.order))
            free -= g.size
            g.resize(p, 2 * g.size)
            continue
        new = _split_off(p, groups, free)
        if new is None:
            return False
        new.order = len(groups)
        groups.append(new)
        free -= new.size
    return True


def _split_off(p: Problem, groups: list[_Group], free: int) -> _Group | None:
    size = max(s for s in p.sizes if s <= free)
    donors = [g for g in groups if len(g.seqs) > 1 and p.min_size[g.seqs[-1]] <= size]
    if not donors:
        return None
    donor = max(donors, key=lambda g: (g.load, -g.order))
    new = _Group(size)
    new.add(p, donor.remove_last(p))
    return new


def best_greedy(p: Problem, chunk: Sequence[int]) -> tuple[list[Draft], str] | None:
    """The fastest of the heterogeneous plan and the homogeneous plans (every size) for one micro-batch.

    A size is tried only if its bound (β + the longer of its longest sequence and its average group load)
    beats the best plan so far, so most sizes cost a sum, not a packing.
    """
    best: tuple[float, list[Draft], str] | None = None
    drafts = heterogeneous(p, chunk)
    if drafts is not None:
        best = (makespan(p, drafts), drafts, "heterogeneous")
    for bound, size in sorted((_homogeneous_bound(p, chunk, s), s) for s in p.sizes):
        if best is not None and bound >= best[0]:
            break
        drafts = homogeneous(p, chunk, size)
        if drafts is not None and (best is None or makespan(p, drafts) < best[0]):
            best = (makespan(p, drafts), drafts, f"static-{size}")
    return None if best is None else (best[1], best[2])


def _homogeneous_bound(p: Problem, chunk: Sequence[int], size: int) -> float:
    if any(p.min_size[i] > size for i in chunk):
        return float("inf")
    times = p.times[size]
    return p.cost.beta + max(max(times[i] for i in chunk), sum(times[i] for i in chunk) * size / p.n_ranks)


def megatron_microbatches(p: Problem) -> list[list[Draft]]:
    """Megatron's greedy hybrid-CP schedule of the whole step (its own micro-batching, see the docstring)."""
    remaining = longest_first(p, range(len(p.lengths)))
    out = []
    while remaining:
        groups, remaining = _megatron_microbatch(p, remaining)
        out.append([g.draft() for g in groups])
    return out


def _megatron_microbatch(p: Problem, queue: list[int]) -> tuple[list[_Group], list[int]]:
    groups: list[_Group] = []
    free, first_needed, check_balance = p.n_ranks, None, False
    leftovers: list[int] = []
    for pos, i in enumerate(queue):
        needed = p.min_size[i]
        first_needed = first_needed or needed
        placed = _megatron_place(p, groups, i, needed, free)
        if placed is None:
            leftovers.append(i)
            continue
        free -= placed
        check_balance = check_balance or needed < first_needed
        if check_balance and free == 0 and _balanced(groups) and pos + 1 < len(queue):
            leftovers.extend(queue[pos + 1:])
            break
    if free == 0:
        leftovers.extend(_trim_overload(p, groups))
    if not _megatron_fill(p, groups, free):
        raise ValueError("megatron schedule: too few sequences to keep every rank busy in a micro-batch")
    return groups, longest_first(p, leftovers)


def _megatron_place(p: Problem, groups: list[_Group], i: int, needed: int, free: int) -> int | None:
    """Place sequence i; the ranks a fresh group took (0 when it joined one), or None if it must wait."""
    same = [g for g in groups if g.size == needed and g.fits(p, i)]
    best = min(same, key=lambda g: (g.work, g.order)) if same else None
    if free >= needed and (best is None or best.work > 0):
        groups.append(_Group(needed, len(groups)))
        groups[-1].add(p, i)
        return needed
    if best is None:
        return None
    best.add(p, i)
    return 0


def _megatron_fill(p: Problem, groups: list[_Group], free: int) -> bool:
    """Megatron's `fill_empty_gpus`: double the smallest group (the first made) until no rank is idle; where a
    doubling is impossible (size cap), split a sequence off like the other greedies."""
    while free > 0:
        smallest = min(groups, key=lambda g: (g.size, g.order))
        if smallest.size > free or 2 * smallest.size > p.max_size:
            return _fill_free_ranks(p, groups, free)
        free -= smallest.size
        smallest.resize(p, 2 * smallest.size)
    return True


def _balanced(groups: list[_Group]) -> bool:
    works = [g.work for g in groups]
    return max(works) - min(works) <= MEGATRON_BALANCE_SLACK * max(works)


def _trim_overload(p: Problem, groups: list[_Group]) -> list[int]:
    """Shed the most loaded group's last sequence while that narrows the spread of workloads."""
    shed = []
    while groups:
        works = [g.work for g in groups]
        top = groups[works.index(max(works))]
        spread = max(works) - min(works)
        if spread <= MEGATRON_BALANCE_SLACK * max(works) or len(top.seqs) <= 1:
            break
        last = top.seqs[-1]
        after = [w - (p.lengths[last] ** 2 / top.size if g is top else 0) for g, w in zip(groups, works)]
        if max(after) - min(after) >= spread:
            break
        shed.append(top.remove_last(p))
    return shed
