"""The adaptive SP planner (parallel/adaptive/): MILP = brute force on tiny instances, legal plans, wire format,
fallback, peers. Pure Python + scipy: no processes."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.optimize import OptimizeResult

from meshweave.parallel.adaptive import (
    AdaptivePlanWarning,
    CostModel,
    StepPlan,
    buddy_layout,
    candidate_sizes,
    flexsp_gpt7b_capacity,
    min_group_size,
    plan_step,
    validate_plan,
)
from meshweave.parallel.adaptive import milp as milp_module
from meshweave.parallel.adaptive.blaster import partitions
from meshweave.parallel.adaptive.buckets import bucket_lengths
from meshweave.parallel.adaptive.cost import rank_tokens
from meshweave.parallel.adaptive.greedy import best_greedy, makespan
from meshweave.parallel.adaptive.groups import is_aligned_cover
from meshweave.parallel.adaptive.milp import solve_microbatch
from meshweave.parallel.adaptive.problem import Problem

EXACT = {"time_limit_s": 20.0, "mip_gap": 0.0}
# A time-limited MILP may fall back (with this warning) on a loaded machine; the tests that need it assert it.
quiet_fallback = pytest.mark.filterwarnings("ignore::meshweave.parallel.adaptive.AdaptivePlanWarning")


def tiny_cost(rng: np.random.Generator) -> CostModel:
    """Random coefficients with comm heavy enough that neither 1 nor N ranks always wins."""
    return CostModel(alpha1=float(rng.uniform(0, 2e-3)), alpha2=float(rng.uniform(0.01, 0.1)),
                     beta=float(rng.uniform(0, 0.5)), comm_bytes_per_token=float(rng.uniform(0, 8)),
                     bandwidth={2: float(rng.uniform(20, 80)), 4: float(rng.uniform(5, 40))})


def brute_force(lengths: list[int], n_ranks: int, cost: CostModel, capacity: int, max_group: int | None) -> float:
    """Least makespan of one micro-batch over every layout of candidate sizes and every assignment."""
    sizes = candidate_sizes(n_ranks, max_group)
    times = {s: cost.seq_times(lengths, s).tolist() for s in sizes}
    best = float("inf")
    for layout in _layouts(n_ranks, sizes):
        for assign in itertools.product(range(len(layout)), repeat=len(lengths)):
            load = [0.0] * len(layout)
            mem = [0] * len(layout)
            for i, g in enumerate(assign):
                load[g] += times[layout[g]][i]
                mem[g] += rank_tokens(lengths[i], layout[g])
            if len(set(assign)) == len(layout) and max(mem) <= capacity:
                best = min(best, max(load) + cost.beta)
    return best


def _layouts(n: int, sizes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Multisets of sizes (descending) that sum to n."""
    if n == 0:
        return [()]
    return [(s, *rest) for s in sorted(sizes, reverse=True) if s <= n
            for rest in _layouts(n - s, tuple(x for x in sizes if x <= s))]


def tiny_instance(seed: int) -> tuple[list[int], int, CostModel, int, int | None]:
    rng = np.random.default_rng(seed)
    n_ranks = int(rng.choice([1, 2, 4]))
    max_group = None if rng.random() < 0.7 else int(rng.choice([1, 2, 4]))
    max_size = min(max_group or n_ranks, n_ranks)
    n = int(rng.integers(max(1, n_ranks // max_size), 7))
    lengths = rng.integers(1, 60, n).tolist()
    capacity = int(rng.integers(-(-max(lengths) // max_size), 2 * max(lengths) + 1))
    return lengths, n_ranks, tiny_cost(rng), capacity, max_group


@pytest.mark.parametrize("seed", range(24))
def test_milp_equals_brute_force_on_one_microbatch(seed):
    lengths, n_ranks, cost, capacity, max_group = tiny_instance(seed)
    p = Problem.build(lengths, n_ranks, cost, capacity, max_group)
    best = brute_force(lengths, n_ranks, cost, capacity, max_group)
    result = solve_microbatch(p, list(range(len(lengths))), None, **EXACT)
    if best == float("inf"):
        assert result.drafts is None and result.status == "infeasible"
        return
    assert result.status == "optimal"
    assert makespan(p, result.drafts) == pytest.approx(best, rel=1e-6)


@pytest.mark.parametrize("seed", range(24, 40))
def test_plan_step_microbatches_are_each_optimal(seed):
    lengths, n_ranks, cost, capacity, max_group = tiny_instance(seed)
    plan = plan_step(lengths, n_ranks, cost, capacity, max_group=max_group, **EXACT)
    validate_plan(plan, lengths, capacity, max_group)
    assert plan.solver == "milp"
    for mb in plan.microbatches:
        seqs = sorted(i for g in mb.groups for i in g.sequences)
        sub = [lengths[i] for i in seqs]
        assert mb.predicted_s == pytest.approx(brute_force(sub, n_ranks, cost, capacity, max_group), rel=1e-6)


def long_tail(n: int, seed: int, median: int = 2048, sigma: float = 1.6, max_len: int = 65536) -> list[int]:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), sigma, n), 64, max_len).astype(int).tolist()


STRATEGIES = ["milp", "greedy", "megatron", "static-4", "static-8"]


@quiet_fallback
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plans_are_legal(strategy):
    """Every sequence once, memory within capacity, aligned blocks covering every rank, no empty group."""
    cost = CostModel.flexsp_gpt7b()
    lengths = long_tail(96, seed=1)
    capacity = 16384
    plan = plan_step(lengths, 8, cost, capacity, strategy=strategy, time_limit_s=0.5)
    validate_plan(plan, lengths, capacity, None)
    for mb in plan.microbatches:
        assert is_aligned_cover([(g.start, g.size) for g in mb.groups], 8)
        for g in mb.groups:
            assert g.sequences and sum(rank_tokens(lengths[i], g.size) for i in g.sequences) <= capacity
            assert all(min_group_size(lengths[i], capacity) <= g.size for i in g.sequences)
    assert plan.solver in {"milp", "milp-timeout", "greedy-fallback"} or plan.solver == strategy
    assert plan.predicted_s == pytest.approx(sum(mb.predicted_s for mb in plan.microbatches))


@quiet_fallback
def test_group_sizes_respect_max_group_and_odd_rank_counts():
    cost = CostModel.flexsp_gpt7b()
    lengths = long_tail(64, seed=2, max_len=30000)
    plan = plan_step(lengths, 12, cost, 8192, max_group=4, time_limit_s=0.5)     # sizes 1, 2, 4 tile 12 ranks
    validate_plan(plan, lengths, 8192, 4)
    assert candidate_sizes(12) == (1, 2, 4) and candidate_sizes(64, 32) == (1, 2, 4, 8, 16, 32)
    assert buddy_layout([1, 4, 2, 1, 8]) == [(0, 8), (8, 4), (12, 2), (14, 1), (15, 1)]


@quiet_fallback
def test_milp_never_worse_than_greedy():
    cost = CostModel.flexsp_gpt7b()
    for seed in range(4):
        lengths = long_tail(48, seed=10 + seed)
        milp_plan = plan_step(lengths, 8, cost, 16384, time_limit_s=0.5)
        greedy_plan = plan_step(lengths, 8, cost, 16384, strategy="greedy")
        assert milp_plan.predicted_s <= greedy_plan.predicted_s * (1 + 1e-12)


def test_encode_decode_round_trip_and_stable_digest():
    cost = CostModel.flexsp_gpt7b()
    lengths = long_tail(40, seed=3)
    plan = plan_step(lengths, 8, cost, 16384, strategy="greedy")
    code = plan.encode()
    assert all(isinstance(x, int) for x in code)
    back = StepPlan.decode(code)
    assert back == plan and back.encode() == code and back.digest() == plan.digest()
    again = plan_step(lengths, 8, cost, 16384, strategy="greedy")
    assert again.digest() == plan.digest()                        # solve time differs, digest does not
    assert 0 <= plan.digest() < 2 ** 63
    fixed = StepPlan.decode([1, 2, 7, 4, 109, 105, 108, 112, 1, 1500, 1, 0, 2, 2, 0, 1])
    assert fixed.digest() == 334952247753740090                  # the digest's bytes are part of the format
    assert fixed.group_of(0, 1).sequences == (0, 1) and fixed.predicted_s == 1.5e-6
    with pytest.raises(ValueError, match="ends early|overruns"):
        StepPlan.decode(code[:-1])


def _no_solution(*args, **kwargs):
    return OptimizeResult(x=None, status=1, message="Time limit reached (forced by the test)", success=False)


def test_forced_timeout_falls_back_to_greedy_with_a_warning(monkeypatch):
    cost = CostModel.flexsp_gpt7b()
    lengths = long_tail(48, seed=4)
    greedy_plan = plan_step(lengths, 8, cost, 16384, strategy="greedy")
    monkeypatch.setattr(milp_module, "milp", _no_solution)
    with pytest.warns(AdaptivePlanWarning, match="greedy"):             # time enough to call the solver
        plan = plan_step(lengths, 8, cost, 16384, mip_gap=0.0, time_limit_s=10.0)
    assert plan.solver == "greedy-fallback"
    assert plan.microbatches == greedy_plan.microbatches


def test_solver_error_falls_back_to_greedy_with_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("HiGHS crashed")
    monkeypatch.setattr(milp_module, "milp", broken)
    lengths = long_tail(48, seed=4)
    with pytest.warns(AdaptivePlanWarning, match="HiGHS crashed"):
        plan = plan_step(lengths, 8, CostModel.flexsp_gpt7b(), 16384, mip_gap=0.0, time_limit_s=10.0)
    assert plan.solver == "greedy-fallback"


@quiet_fallback
def test_tiny_time_limit_on_a_big_instance_never_raises():
    cost = CostModel.flexsp_gpt7b()
    lengths = long_tail(256, seed=5, max_len=262144)
    plan = plan_step(lengths, 32, cost, flexsp_gpt7b_capacity(32), time_limit_s=1e-4)
    validate_plan(plan, lengths, flexsp_gpt7b_capacity(32), None)
    assert plan.solver in {"milp", "milp-timeout", "greedy-fallback"}


def test_deterministic():
    cost = CostModel.flexsp_gpt7b()
    lengths = long_tail(64, seed=6)
    small = lengths[:12]                                    # solved to optimality well within the limit
    plans = [plan_step(small, 4, cost, 65536, time_limit_s=20.0, mip_gap=0.0) for _ in range(2)]
    assert plans[0].solver == "milp"
    assert plans[0].encode(with_solve_time=False) == plans[1].encode(with_solve_time=False)
    for strategy in ("megatron", "static-8", "greedy"):
        a, b = (plan_step(lengths, 8, cost, 16384, strategy=strategy) for _ in range(2))
        assert a.encode(with_solve_time=False) == b.encode(with_solve_time=False)


def test_identical_across_processes():
    """Two interpreters with different hash seeds (two ranks) plan the same bytes: no set or dict order leaks."""
    code = ("import numpy as np; from meshweave.parallel.adaptive import CostModel, plan_step; "
            "L = np.clip(np.random.default_rng(5).lognormal(np.log(2048), 1.6, 200), 64, 65536).astype(int).tolist(); "
            "c = CostModel.flexsp_gpt7b(); "
            "print(plan_step(L, 16, c, 16384, strategy='greedy').digest(), "
            "plan_step(L, 16, c, 16384, strategy='megatron').digest(), "
            "plan_step(L[:10], 4, c, 65536, time_limit_s=20.0, mip_gap=0.0).digest())")
    root = Path(__file__).resolve().parents[1]
    outs = [subprocess.run([sys.executable, "-c", code], check=True, cwd=root, capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")]
    assert outs[0] == outs[1] and outs[0].strip()


@quiet_fallback
def test_peers_are_legal_and_slower_than_adaptive_on_a_long_tail():
    cost = CostModel.flexsp_gpt7b()
    lengths = long_tail(128, seed=7)
    capacity = 16384
    plans = {s: plan_step(lengths, 16, cost, capacity, strategy=s, time_limit_s=0.5)
             for s in ("milp", "megatron", "static-4", "static-8", "static-16")}
    for plan in plans.values():
        validate_plan(plan, lengths, capacity, None)
    assert plans["milp"].predicted_s < min(p.predicted_s for s, p in plans.items() if s.startswith("static"))
    assert plans["milp"].predicted_s < plans["megatron"].predicted_s


@quiet_fallback
@pytest.mark.parametrize("seed", range(6))
def test_random_small_steps_give_legal_plans_or_clear_errors(seed):
    """Every strategy on odd little steps (size caps below N, memory tight, few sequences): a legal plan, or one
    of the documented errors (a static size too small, or no micro-batching that keeps every rank busy)."""
    cost = CostModel.flexsp_gpt7b()
    for case in range(12):
        rng = np.random.default_rng(100 * seed + case)
        n_ranks = int(rng.choice([2, 4, 8, 16]))
        max_group = min(int(rng.choice([1, 2, 4, 8, 16])), n_ranks)
        lengths = rng.integers(1, 5000, int(rng.integers(n_ranks // max_group, n_ranks // max_group + 12))).tolist()
        capacity = int(rng.integers(-(-max(lengths) // max_group), 3 * max(lengths)))
        for strategy in ["milp", "greedy", "megatron"] + [f"static-{s}" for s in candidate_sizes(n_ranks, max_group)]:
            try:
                plan = plan_step(lengths, n_ranks, cost, capacity, max_group=max_group, strategy=strategy,
                                 time_limit_s=0.05)
            except ValueError as err:
                assert re.search("cannot hold|needs at least|found no micro-batching|too few sequences", str(err))
                continue
            validate_plan(plan, lengths, capacity, max_group)


def test_clear_errors():
    cost = CostModel.flexsp_gpt7b()
    with pytest.raises(ValueError, match=r"70000 tokens.*8 ranks.*1000 tokens per rank.*data.max_len"):
        plan_step([70000, 10], 8, cost, 1000)
    with pytest.raises(ValueError, match="largest allowed group of 2"):
        plan_step([3000, 10, 10, 10], 8, cost, 1000, max_group=2)
    with pytest.raises(ValueError, match="3 sequences cannot keep 8 ranks busy"):
        plan_step([10, 10, 10], 8, cost, 1000, max_group=2)
    with pytest.raises(ValueError, match="unknown strategy"):
        plan_step([10, 10], 2, cost, 1000, strategy="random")
    with pytest.raises(ValueError, match="static-2 cannot hold"):
        plan_step([3000, 10, 10, 10], 4, cost, 1000, strategy="static-2")
    with pytest.raises(ValueError, match="bandwidth has no entry"):
        CostModel(1e-9, 1e-6, 0.0, 10.0, {4: 1e9}).seq_time(100, 2)


def test_cost_model_formulas():
    cost = CostModel(alpha1=2.0, alpha2=3.0, beta=0.5, comm_bytes_per_token=8.0, bandwidth={2: 4.0, 8: 2.0})
    assert cost.seq_time(10, 1) == 2.0 * 100 + 3.0 * 10
    assert cost.seq_time(10, 2) == pytest.approx((200 + 30) / 2 + 8 * 10 * 0.5 / 2 / 4.0)
    assert cost.comm_time(10, 4) == pytest.approx(8 * 10 * 0.75 / 4 / 4.0)     # 4 uses the bandwidth of 2
    assert cost.group_time([10, 10], 1) == pytest.approx(2 * 230 + 0.5)
    assert [min_group_size(x, 100) for x in (1, 100, 101, 300, 400, 401)] == [1, 1, 2, 4, 4, 8]


def test_bucketing_is_the_least_padding():
    rng = np.random.default_rng(8)
    for _ in range(20):
        lengths = rng.integers(1, 50, int(rng.integers(1, 12))).tolist()
        start = int(rng.integers(1, 5))
        buckets = bucket_lengths(lengths, 10 ** 9, start=start, max_buckets=start, pad_fraction=0.0)
        assert sorted(i for b in buckets for i in b.members) == list(range(len(lengths)))
        assert all(lengths[i] <= b.boundary for b in buckets for i in b.members)
        pad = sum(b.boundary * len(b.members) for b in buckets) - sum(lengths)
        values = sorted(set(lengths))
        best = min(sum(max(v for v in values[a:b]) * sum(1 for x in lengths if values[a] <= x <= values[b - 1])
                       for a, b in zip((0, *cuts), (*cuts, len(values))))
                   for cuts in itertools.combinations(range(1, len(values)), min(start, len(values)) - 1))
        assert pad == best - sum(lengths)
    assert len(bucket_lengths([5, 5, 7, 9], 100)) == 3                    # few distinct lengths: exact buckets
    many = rng.integers(1, 100000, 3000).tolist()                          # above ATOMS distinct lengths
    buckets = bucket_lengths(many, 10 ** 12)
    assert sorted(i for b in buckets for i in b.members) == list(range(3000))
    assert all(many[i] <= b.boundary for b in buckets for i in b.members) and len(buckets) <= 48
    assert [b.boundary for b in buckets] == sorted((b.boundary for b in buckets), reverse=True)


def test_blaster_minimises_the_largest_chunk():
    rng = np.random.default_rng(9)
    for _ in range(60):
        n = int(rng.integers(1, 9))
        lengths = sorted(rng.integers(1, 100, n).tolist(), reverse=True)
        min_count = int(rng.integers(1, 3))
        cuts = partitions(lengths, range(1, n + 1), min_count)
        for count in range(1, n + 1):
            best = None
            for inner in itertools.combinations(range(1, n), count - 1):
                bounds = (0, *inner, n)
                if min(b - a for a, b in itertools.pairwise(bounds)) >= min_count:
                    worst = max(sum(lengths[a:b]) for a, b in itertools.pairwise(bounds))
                    best = worst if best is None else min(best, worst)
            if best is None:
                assert count not in cuts
                continue
            sizes, at, worst = cuts[count], 0, 0
            for s in sizes:
                worst, at = max(worst, sum(lengths[at:at + s])), at + s
            assert len(sizes) == count and min(sizes) >= min_count and worst == best


def test_greedy_fallback_candidates_cover_the_chunk():
    cost = CostModel.flexsp_gpt7b()
    lengths = long_tail(64, seed=11)
    p = Problem.build(lengths, 8, cost, sum(lengths))
    drafts, name = best_greedy(p, list(range(64)))
    assert sorted(i for _, s in drafts for i in s) == list(range(64)) and sum(s for s, _ in drafts) == 8
    assert name.startswith("static-") or name == "heterogeneous"


@quiet_fallback
def test_solve_time_512_sequences_on_64_ranks():
    """Recorded, not asserted (timings depend on the machine's load)."""
    cost = CostModel.flexsp_gpt7b()
    lengths = long_tail(512, seed=12, max_len=262144)
    cpu = time.process_time()
    plan = plan_step(lengths, 64, cost, flexsp_gpt7b_capacity(64), max_group=32)
    cpu = time.process_time() - cpu
    validate_plan(plan, lengths, flexsp_gpt7b_capacity(64), 32)
    print(f"\n512 sequences on 64 ranks: solve {plan.solve_s * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU, "
          f"solver {plan.solver}, {len(plan.microbatches)} micro-batches, predicted step {plan.predicted_s:.2f} s")


def test_planner_imports_no_torch():
    """The planner is pure Python + numpy + scipy: rank 0 can plan without torch, and nothing distributed."""
    code = "import sys, meshweave.parallel.adaptive; sys.exit('torch' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
