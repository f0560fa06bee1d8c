"""`plan_step`: one step's micro-batches and SP groups for a batch of whole sequences (FlexSP, §8).

Flow: check and price the problem (problem.py) → cut the sequences, longest first, into micro-batches
(blaster.py's consecutive chunks, or strided ones; a few counts are tried, each planned by the greedy) →
place each micro-batch's sequences on aligned power-of-two groups covering all N ranks (greedy.py, and for
strategy "milp" the MILP of milp.py cut off by the greedy plan) → lay the groups out as buddy blocks (plan.py).

Time-outs: the greedy plan is the MILP's cut-off, so a MILP that HiGHS stops with an incumbent returns a plan
at least as fast ("milp-timeout"); one stopped without any (nothing better than the greedy found in time,
or too little time left to start) keeps the greedy plan, and the step is "greedy-fallback" with an
`AdaptivePlanWarning`. At 64+ ranks that is the usual outcome for the mid-sized micro-batches within 50 ms.

Strategies: "milp" (FlexSP), "greedy" (best greedy per micro-batch: the MILP's fallback), "static-<s>"
(every micro-batch on N/s groups of size s: a fixed SP degree) and "megatron" (Megatron-LM's greedy
hybrid-CP rule with its own micro-batching). Same inputs give the same plan bit for bit, except that a
MILP stopped by its time limit returns whatever incumbent HiGHS held at that moment: which is why the
runtime solves on rank 0, broadcasts the encoding and compares digests.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence

from meshweave.parallel.adaptive.blaster import MICROBATCH_TRIES, fewest_microbatches, partitions
from meshweave.parallel.adaptive.cost import CostModel
from meshweave.parallel.adaptive.greedy import best_greedy, homogeneous, longest_first, makespan, megatron_microbatches
from meshweave.parallel.adaptive.milp import solve_microbatch
from meshweave.parallel.adaptive.plan import (
    Draft,
    GroupAssignment,
    MicroBatchPlan,
    StepPlan,
    assemble_microbatch,
    check_microbatch,
)
from meshweave.parallel.adaptive.problem import Problem

ASSEMBLY_SHARE = 0.1   # of the time limit, kept for laying out and pricing the plan after the MILPs
ChunkPlanner = Callable[[Problem, list[int]], "list[Draft] | None"]


class AdaptivePlanWarning(UserWarning):
    """The MILP gave no usable answer in time (or failed) and the greedy plan stands in for it."""


def plan_step(lengths: Sequence[int], n_ranks: int, cost: CostModel, capacity_tokens: int, *,
              max_group: int | None = None, strategy: str = "milp",
              time_limit_s: float = 0.05, mip_gap: float = 0.01) -> StepPlan:
    """Plan one step: micro-batches of `lengths` (indices into it), each on groups covering all ranks.

    `capacity_tokens` is the most tokens one rank may hold in a micro-batch; `max_group` caps the group size
    (Ulysses: the head count); `time_limit_s` is the wall time planning may take ("milp": the greedy runs
    first, its micro-batch MILPs share the rest); `mip_gap` the relative gap at which a MILP stops. A
    sequence no allowed group can hold raises ValueError; a MILP without an answer falls back to the greedy
    with an `AdaptivePlanWarning`.
    """
    start = time.perf_counter()
    p = Problem.build(lengths, n_ranks, cost, capacity_tokens, max_group)
    if strategy == "megatron":
        micro, solver = megatron_microbatches(p), "megatron"
    elif strategy.startswith("static-"):
        size = _static_size(p, strategy)
        micro, solver = _blast(p, lambda q, chunk: homogeneous(q, chunk, size), p.n_ranks // size), strategy
    elif strategy == "greedy":
        micro, solver = _blast(p, _greedy_drafts, p.min_groups), "greedy"
    elif strategy == "milp":
        micro, solver = _milp(p, start + (1 - ASSEMBLY_SHARE) * time_limit_s, time_limit_s, mip_gap)
    else:
        raise ValueError(f"adaptive plan: unknown strategy {strategy!r}; use milp, greedy, megatron or static-<s>")
    plans = tuple(assemble_microbatch(drafts, p.lengths, cost, makespan(p, drafts)) for drafts in micro)
    return StepPlan(n_ranks, plans, solver, time.perf_counter() - start)


def _static_size(p: Problem, strategy: str) -> int:
    try:
        size = int(strategy.removeprefix("static-"))
    except ValueError:
        size = 0
    if size not in p.sizes:
        raise ValueError(f"adaptive plan: strategy {strategy!r} needs a group size among {list(p.sizes)}")
    if len(p.lengths) < p.n_ranks // size:
        raise ValueError(f"adaptive plan: {strategy} needs at least {p.n_ranks // size} sequences per step (one per "
                         f"group), got {len(p.lengths)}")
    longest = max(range(len(p.lengths)), key=lambda i: p.lengths[i])
    if p.min_size[longest] > size:
        raise ValueError(f"adaptive plan: {strategy} cannot hold a sequence of {p.lengths[longest]} tokens at "
                         f"{p.capacity} tokens per rank (needs groups of {p.min_size[longest]})")
    return size


def _greedy_drafts(p: Problem, chunk: list[int]) -> list[Draft] | None:
    found = best_greedy(p, chunk)
    return None if found is None else found[0]


def _blast(p: Problem, plan_chunk: ChunkPlanner, min_count: int) -> list[list[Draft]]:
    """Micro-batches by the blaster, each planned by `plan_chunk`: the count with the least Σ makespan among
    the first MICROBATCH_TRIES counts (from the fewest that hold the tokens) whose every chunk has a plan."""
    found = _blast_options(p, plan_chunk, min_count, MICROBATCH_TRIES)
    return min(found, key=lambda f: (f[0], len(f[1])))[1]


Option = tuple[float, list[list[Draft]], list[list[int]]]   # (Σ makespan, drafts per micro-batch, chunks)


def _blast_options(p: Problem, plan_chunk: ChunkPlanner, min_count: int, tries: int) -> list[Option]:
    """Planned micro-batchings for up to `tries` counts, fewest micro-batches first.

    Each count is cut two ways: the blaster's consecutive chunks of the sorted lengths (long sequences
    together: what a long tail needs) and strided ones (sequence k to micro-batch k mod mb: long and short
    mixed, which packs memory better when lengths are alike; our addition to FlexSP's blaster). A cut whose
    chunks' lower bounds already add up to more than the best plan found is not planned, and the search
    stops once the best Σ makespan rises from one count to the next (each extra micro-batch costs every
    group another β, and the rest is the same work).
    """
    order = longest_first(p, range(len(p.lengths)))
    most = len(order) // min_count
    mb = fewest_microbatches(sum(p.lengths), p.n_ranks, p.capacity)
    found: list[Option] = []
    tried, last = 0, None                       # counts planned or ruled out; the previous count's best
    while mb <= most and tried < tries:
        window = range(mb, min(most, mb + tries - tried - 1) + 1)
        cuts = partitions([p.lengths[i] for i in order], window, min_count)
        for count in window:
            cut_ways = ([_chunks(order, cuts[count])] if count in cuts else []) + [_strided(order, count)]
            bounded = [c for c in cut_ways if found and _bound(p, c) >= min(f[0] for f in found)]
            options = [o for o in (_plan_chunks(p, plan_chunk, c) for c in cut_ways if c not in bounded) if o]
            found += options
            tried += 1 if options or bounded else 0     # a count no cut of which fits does not count
            best = min((o[0] for o in options), default=None)
            if best is not None and last is not None and best > last:
                tried = tries                   # Σ makespan turned up
                break
            last = best if best is not None else last
        mb = window[-1] + 1
    if not found:
        raise ValueError(f"adaptive plan: found no micro-batching of {len(order)} sequences (longest "
                         f"{max(p.lengths)} tokens) within {p.capacity} tokens per rank on {p.n_ranks} ranks; "
                         f"lower data.max_len or raise the memory per rank")
    return found


def _bound(p: Problem, chunks: list[list[int]]) -> float:
    return sum(p.lower_bound(c) for c in chunks)


def _strided(order: list[int], count: int) -> list[list[int]]:
    return [order[k::count] for k in range(count)]


def _chunks(order: list[int], sizes: list[int]) -> list[list[int]]:
    out, at = [], 0
    for n in sizes:
        out.append(order[at:at + n])
        at += n
    return out


def _plan_chunks(p: Problem, plan_chunk: ChunkPlanner, chunks: list[list[int]]) -> Option | None:
    micro = []
    for chunk in chunks:
        drafts = plan_chunk(p, chunk)
        if drafts is None:
            return None
        micro.append(drafts)
    return sum(makespan(p, d) for d in micro), micro, chunks


def _milp(p: Problem, deadline: float, time_limit_s: float, mip_gap: float) -> tuple[list[list[Draft]], str]:
    """The micro-batching the greedy likes best, then each micro-batch's MILP, cut off by its greedy plan.

    A micro-batch whose greedy plan is already within the gap of its lower bound is not solved. The others
    share what is left of the step's time limit (the greedy runs first, inside it) in proportion to what they could still gain (greedy − lower bound): in a long-tail
    step that is the micro-batch of the few longest sequences, where the choice of group sizes matters most.
    The MILP plan replaces the greedy one only where it is faster at the actual lengths (bucketing prices
    sequences at their bucket's longest length, so a bucketed optimum can lose to the greedy by a hair).
    """
    options = _blast_options(p, _greedy_drafts, p.min_groups, MICROBATCH_TRIES)
    _, micro, chunks = min(options, key=lambda f: (f[0], len(f[1])))
    gains = [max(0.0, makespan(p, g) - p.lower_bound(c) * (1 + mip_gap)) for c, g in zip(chunks, micro)]
    statuses, problems = [], []
    for k, chunk in enumerate(chunks):
        if gains[k] == 0.0:
            statuses.append("optimal")       # within the gap of the bound: the greedy plan is good enough
            continue
        budget = (deadline - time.perf_counter()) * gains[k] / sum(gains[k:])
        micro[k], status, problem = _solve_one(p, chunk, micro[k], budget, mip_gap)
        statuses.append(status)
        if problem:
            problems.append(f"micro-batch {k}: {problem}")
    if problems:
        _warn_fallback(problems, time_limit_s)
        return micro, "greedy-fallback"
    return micro, "milp-timeout" if "timeout" in statuses else "milp"


def _warn_fallback(problems: list[str], time_limit_s: float) -> None:
    """One warning per step that fell back. A plain time-out keeps one message text (so Python shows it once
    per run, not every step); solver errors name themselves."""
    errors = [x for x in problems if "Time limit" not in x]
    detail = f" ({errors[0]})" if errors else ""
    warnings.warn(f"adaptive plan: the MILP found no plan better than the greedy one in time for some "
                  f"micro-batches{detail}; they use the greedy plan (solver 'greedy-fallback'). Raise "
                  f"parallel.adaptive.time_limit_s (now {time_limit_s:g} s) for better plans",
                  AdaptivePlanWarning, stacklevel=4)


def _solve_one(p: Problem, chunk: list[int], greedy: list[Draft], budget: float,
               mip_gap: float) -> tuple[list[Draft], str, str]:
    """(drafts, solver status, problem or "") for one micro-batch; the greedy stands in when the MILP fails."""
    try:
        result = solve_microbatch(p, chunk, greedy, time_limit_s=budget, mip_gap=mip_gap)
    except Exception as err:  # noqa: BLE001 - any solver failure must fall back, never stop training
        return greedy, "error", f"{type(err).__name__}: {err}"
    if result.status == "infeasible":         # nothing beats the greedy at the bucket lengths
        return greedy, "optimal", ""
    if result.drafts is None:
        return greedy, result.status, result.message or result.status
    problem = _draft_problem(p, chunk, result.drafts)
    if problem:
        return greedy, "error", problem
    better = makespan(p, result.drafts) <= makespan(p, greedy)
    return (result.drafts if better else greedy), result.status, ""


def _draft_problem(p: Problem, chunk: list[int], drafts: list[Draft]) -> str:
    """Why the MILP's groups are not a legal micro-batch of `chunk` ("" if they are): a last check on rounding."""
    if sorted(i for _, seqs in drafts for i in seqs) != sorted(chunk):
        return "the solution does not place every sequence of the micro-batch once"
    try:
        check_microbatch(0, assemble_microbatch(drafts, p.lengths, p.cost), p.n_ranks, p.lengths, p.capacity,
                         p.max_size)
    except ValueError as err:
        return str(err)
    return ""


__all__ = ["AdaptivePlanWarning", "GroupAssignment", "MicroBatchPlan", "StepPlan", "plan_step"]
