"""LASP-2H's softmax half (meshweave.attention.lasp2h: all-gather K/V) against the single-process fp64 softmax
reference, in the zigzag (ring) and contiguous (ulysses) layouts, causal and not, MHA and GQA, with packed
documents; and its traffic: one all_gather of K/V in forward, one reduce_scatter of dK/dV in backward.

Tolerance 1e-10 in fp64 (as tests/test_attention_sp.py: only rounding separates the two).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from meshweave.attention import build_attention_op, shard_sequence, unshard_sequence
from meshweave.attention.lasp2h import AllGatherKVSequenceParallel
from meshweave.core.comm import CommGroup, CommLedger, single_process_group
from meshweave.models.attention_api import AttentionMeta
from meshweave.testing import run_distributed
from tests.attention_helpers import B, Case, D, H, make_inputs, reference_with_grads

TOL = {"atol": 1e-10, "rtol": 1e-10}
CASES = [Case(method, causal, h_kv, docs) for method in ("ring", "ulysses") for causal in (True, False)
         for h_kv in (H, 2) for docs in (False, True)]


def run_cases(cases: list[Case]) -> list[dict]:
    world = dist.get_world_size() if dist.is_initialized() else 1
    ranks = list(range(world))
    group = CommGroup("sp", dist.new_group(ranks), ranks, CommLedger()) if world > 1 else single_process_group("sp")
    out = []
    for case in cases:
        # "allgather" is the config's sp_method: the op comes through the seam every SP method shares
        op = build_attention_op("allgather", group) if case.method == "allgather" else \
            AllGatherKVSequenceParallel(group, case.method)
        full = make_inputs(case, world)
        shard = lambda x, case=case: shard_sequence(x, case.method, group.rank, world)
        q, k, v = (shard(full[name]).requires_grad_() for name in ("q", "k", "v"))
        meta = AttentionMeta(shard(full["docs"]) if case.docs else None, case.causal)
        op(q, k, v, meta)  # first layer of the batch: plans and document ids
        group.ledger.reset()
        y = op(q, k, v, meta)
        fwd = group.ledger.snapshot()
        group.ledger.reset()
        dq, dk, dv = torch.autograd.grad(y, (q, k, v), shard(full["dout"]))
        out.append({"rank": group.rank, "out": y.detach(), "dq": dq, "dk": dk, "dv": dv, "fwd": fwd,
                    "bwd": group.ledger.snapshot()})
    return out


@pytest.mark.parametrize("p", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_allgather_kv_attention_matches_reference(p):
    per_rank = [run_cases(CASES)] if p == 1 else run_distributed(run_cases, p, CASES, timeout=300)
    assert_matches_reference_with_exact_traffic(per_rank, CASES, p)


def test_sp_method_allgather_matches_reference_with_the_formula_traffic():
    """`sp_method: allgather` through build_attention_op: zigzag layout, exact output, K/V traffic as the formula."""
    cases = [Case("allgather", True, 2, True), Case("allgather", False, H, False)]
    assert_matches_reference_with_exact_traffic(run_distributed(run_cases, 2, cases), cases, 2)


def assert_matches_reference_with_exact_traffic(per_rank: list[list[dict]], cases: list[Case], p: int) -> None:
    """Every case's unsharded output and gradients equal the fp64 reference; each rank's ledger shows one
    all_gather of its K/V forward and one reduce_scatter of all shards' dK/dV backward."""
    for i, case in enumerate(cases):
        shards = sorted((per_rank[r][i] for r in range(p)), key=lambda s: s["rank"])
        ref = reference_with_grads(make_inputs(case, p), case.causal)
        for key in ("out", "dq", "dk", "dv"):
            got = unshard_sequence([s[key] for s in shards], case.method, dim=1)
            torch.testing.assert_close(got, ref[key], **TOL, msg=lambda m, key=key, case=case: f"{case} {key}: {m}")
        kv = 2 * B * case.h_kv * case.tokens_per_rank * D * 8  # this rank's K and V, fp64
        want = ({}, {}) if p == 1 else ({"sp/all_gather": {"calls": 1, "bytes": kv}},
                                         {"sp/reduce_scatter": {"calls": 1, "bytes": p * kv}})
        for s in shards:
            assert (s["fwd"], s["bwd"]) == want, f"{case}: traffic {s['fwd']} / {s['bwd']} != {want}"
