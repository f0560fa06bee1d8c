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
    groups = _homogeneous_groups(p, chunk, size)
    return None if groups is None else [g.draft() for g in groups]


def _homogeneous_groups(p: Problem, chunk: Sequence[int], size: int) -> list[_Group] | None:
    n_groups = p.n_ranks // size
    if len(chunk) < n_groups or any(p.min_size[i] > size for i in chunk):
        return None
    groups = [_Group(size, g) for g in range(n_groups)]
    heap = _LoadHeap(p, groups, size)
    for g in groups:
        heap.push(g)
    for i in longest_first(p, chunk):
        g = heap.least_loaded_fitting(i)
        if g is None:
            return None
        g.add(p, i)
        heap.push(g)
    return None if any(not g.seqs for g in groups) else groups


class _LoadHeap:
    """Groups of one size by (load, sequences, creation order), least loaded first, for sequences that come
    longest first. A group without room for the current sequence is parked by its free memory and returns
    once the sequences have shrunk enough to fit, so a full machine costs O(log G), not a scan, per sequence.
    Entries of groups that changed since they were pushed are stale and dropped when met."""

    def __init__(self, p: Problem, groups: list[_Group], size: int) -> None:
        self.p, self.groups, self.size = p, groups, size
        self.ready: list[tuple[float, int, int]] = []
        self.parked: list[tuple[int, int]] = []          # (−free tokens, order)

    def push(self, g: _Group) -> None:
        heapq.heappush(self.ready, (g.load, len(g.seqs), g.order))

    def least_loaded_fitting(self, i: int) -> _Group | None:
        need = self.p.tokens[self.size][i]
        while self.parked and -self.parked[0][0] >= need:
            self.push(self.groups[heapq.heappop(self.parked)[1]])
        while self.ready:
            load, count, order = self.ready[0]
            g = self.groups[order]
            if g.load != load or len(g.seqs) != count:
                heapq.heappop(self.ready)                 # stale
            elif self.p.capacity - g.mem < need:
                heapq.heappop(self.ready)
                heapq.heappush(self.parked, (g.mem - self.p.capacity, order))
            else:
                return g
        return None


def heterogeneous(p: Problem, chunk: Sequence[int]) -> list[Draft] | None:
    """Target-driven sizes while ranks are free, earliest-finish joins after; None if something cannot fit."""
    groups = _heterogeneous_groups(p, chunk)
    return None if groups is None else [g.draft() for g in groups]


def _heterogeneous_groups(p: Problem, chunk: Sequence[int]) -> list[_Group] | None:
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
    groups = pool.finish()
    return None if _fill_free_ranks(p, groups, free) else groups


def _size_for_target(p: Problem, i: int, target: float) -> int:
    """Smallest allowed size that brings sequence i under the target, else the largest allowed size."""
    for s in p.sizes:
        if s >= p.min_size[i] and p.times[s][i] <= target:
            return s
    return p.max_size


class _Pool:
    """Groups with one `_LoadHeap` per size: the earliest-finishing group for a sequence in
    O(sizes · log groups) instead of a scan of every group."""

    def __init__(self, p: Problem) -> None:
        self.p = p
        self.groups: list[_Group] = []
        self.by_size: dict[int, list[_Group]] = {s: [] for s in p.sizes}
        self.heaps = {s: _LoadHeap(p, self.by_size[s], s) for s in p.sizes}

    def open(self, size: int, i: int) -> None:
        g = _Group(size, len(self.by_size[size]))     # order inside its size, the heap's index
        self.groups.append(g)
        self.by_size[size].append(g)
        self.add(g, i)

    def add(self, g: _Group, i: int) -> None:
        g.add(self.p, i)
        self.heaps[g.size].push(g)

    def earliest(self, i: int) -> _Group | None:
        best, best_key = None, None
        for s in self.p.sizes:
            if s < self.p.min_size[i] or not self.by_size[s]:
                continue
            g = self.heaps[s].least_loaded_fitting(i)
            if g is not None:
                key = (g.load + self.p.times[s][i], s, g.order)
                if best_key is None or key < best_key:
                    best, best_key = g, key
        return best

    def finish(self) -> list[_Group]:
        """The groups in creation order, renumbered for the fill step."""
        for k, g in enumerate(self.groups):
            g.order = k
        return self.groups


def _fill_free_ranks(p: Problem, groups: list[_Group], free: int) -> int:
    """Give every free rank work: double the busiest group that fits, else split a group's shortest sequence
    off onto a new group. Returns the ranks still free (0 unless there are too few sequences for the ranks)."""
    while free > 0:
        grow = [g for g in groups if g.size <= free and 2 * g.size <= p.max_size]
        if grow:
            g = max(grow, key=lambda g: (g.load, -g.order))
            free -= g.size
            g.resize(p, 2 * g.size)
            continue
        new = _split_off(p, groups, free)
        if new is None:
            return free
        new.order = len(groups)
        groups.append(new)
        free -= new.size
    return 0


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
    best: tuple[float, list[_Group], str] | None = None
    groups = _heterogeneous_groups(p, chunk)
    if groups is not None:
        best = (_groups_makespan(p, groups), groups, "heterogeneous")
    for bound, size in sorted((_homogeneous_bound(p, chunk, s), s) for s in p.sizes):
        if best is not None and bound >= best[0]:
            break
        groups = _homogeneous_groups(p, chunk, size)
        if groups is not None and (best is None or _groups_makespan(p, groups) < best[0]):
            best = (_groups_makespan(p, groups), groups, f"static-{size}")
    return None if best is None else ([g.draft() for g in best[1]], best[2])


def _groups_makespan(p: Problem, groups: list[_Group]) -> float:
    return max(g.load for g in groups) + p.cost.beta


def _homogeneous_bound(p: Problem, chunk: Sequence[int], size: int) -> float:
    if any(p.min_size[i] > size for i in chunk):
        return float("inf")
    times = p.times[size]
    return p.cost.beta + max(max(times[i] for i in chunk), sum(times[i] for i in chunk) * size / p.n_ranks)


def megatron_microbatches(p: Problem) -> list[list[Draft]]:
    """Megatron's greedy hybrid-CP schedule of the whole step (its own micro-batching, see the docstring)."""
    remaining = longest_first(p, range(len(p.lengths)))
    out: list[list[_Group]] = []
    while remaining:
        groups, remaining, free = _megatron_microbatch(p, remaining)
        if free:
            _complete_last(p, out, groups, free)
        out.append(groups)
    return [[g.draft() for g in groups] for groups in out]


def _megatron_microbatch(p: Problem, queue: list[int]) -> tuple[list[_Group], list[int], int]:
    """One micro-batch: (groups, sequences left for later, ranks left idle — 0 unless too few sequences)."""
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
    free = _megatron_fill(p, groups, free)
    while free and leftovers:        # size-capped groups cannot double over the idle ranks: take another sequence
        size = max(s for s in p.sizes if s <= free)
        i = next((i for i in leftovers if p.min_size[i] <= size), None)
        if i is None:
            break
        leftovers.remove(i)
        groups.append(_Group(size, len(groups)))
        groups[-1].add(p, i)
        free = _megatron_fill(p, groups, free - size)
    return groups, longest_first(p, leftovers), free


def _complete_last(p: Problem, out: list[list[_Group]], groups: list[_Group], free: int) -> None:
    """A last micro-batch with too few sequences for its ranks takes the shortest sequences of the previous
    micro-batch's fullest groups onto its idle ranks, or else the two are planned as one micro-batch by our
    greedy (our addition: Megatron asserts here). Group loads are not needed after this point."""
    while free and out:
        size = max(s for s in p.sizes if s <= free)
        donors = [g for g in out[-1] if len(g.seqs) > 1 and p.min_size[g.seqs[-1]] <= size]
        if not donors:
            break
        donor = max(donors, key=lambda g: (len(g.seqs), g.load, -g.order))
        groups.append(_Group(size, len(groups)))
        groups[-1].add(p, donor.remove_last(p))
        free = _megatron_fill(p, groups, free - size)
    if free and out:                 # no donor either: re-plan the last two micro-batches as one (our greedy)
        merged = best_greedy(p, [i for g in out[-1] + groups for i in g.seqs])
        if merged is not None:
            out.pop()
            groups[:] = [_Group(size, k, list(seqs)) for k, (size, seqs) in enumerate(merged[0])]
            free = 0
    if free:
        raise ValueError(f"megatron schedule: too few sequences to keep all {p.n_ranks} ranks busy in its last "
                         f"micro-batch")


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


def _megatron_fill(p: Problem, groups: list[_Group], free: int) -> int:
    """Megatron's `fill_empty_gpus`: double the smallest group (the first made) until no rank is idle; where a
    doubling is impossible (size cap), split a sequence off like the other greedies. Returns the ranks left."""
    while free > 0:
        smallest = min(groups, key=lambda g: (g.size, g.order))
        if smallest.size > free or 2 * smallest.size > p.max_size:
            return _fill_free_ranks(p, groups, free)
        free -= smallest.size
        smallest.resize(p, 2 * smallest.size)
    return 0


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
