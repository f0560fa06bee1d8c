"""Every SP method against a single-process reference on the full sequence, across world sizes.

One distributed task per world size runs all its cases (workers are pooled; start-up costs
seconds). Each case returns this rank's output and input-gradient shards plus the ledger of its
forward and backward; the parent unshards them with the method's layout and compares.

Tolerances: in fp64 the reference and the SP result differ only by rounding (~1e-15 relative for
these O(1) values), so 1e-10 catches any real bug (a skipped or doubled block, a wrong mask row, a
stale merge) by many orders of magnitude. In bf16 the SP error against the fp64 reference must
stay within twice the error of the single-process bf16 computation (max and mean), the error-ratio
test of the reference note.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from meshweave.attention import unshard_sequence
from meshweave.attention.layout import shard_segments
from meshweave.attention.tokenring_comm import build_route, tokenring_bytes
from meshweave.models.attention_api import AttentionMeta, local_attention
from meshweave.testing import run_distributed
from tests.attention_helpers import B, D, H, Case, Groups, make_inputs, merged_snapshot, reference_with_grads

FP64_TOL = dict(atol=1e-10, rtol=1e-10)


def _cases(p: int) -> list[Case]:
    methods = [("ring", None), ("tokenring", None)]
    if p <= H:
        methods.append(("ulysses", None))
        methods += [("usp", u) for u in (1, 2, 4) if p % u == 0]
    if p == 1:
        methods.append(("local", None))
    cases = []
    for method, u in methods:
        for causal in (True, False):
            for h_kv in (H, 2):
                for docs in (False, True):
                    cases.append(Case(method, causal, h_kv, docs, "float64", u))
        cases.append(Case(method, True, 1, True, "float64", u))  # MQA: kv heads replicated for Ulysses
        for causal, docs in ((True, False), (True, True), (False, True)):
            cases.append(Case(method, causal, 2, docs, "bfloat16", u, tokens_per_rank=32))
    return cases


def _run_case(case: Case, groups: Groups) -> dict:
    op, ledgers = groups.op(case)
    p = op.sp_size
    full = make_inputs(case, p)
    dt = case.torch_dtype
    q, k, v = (op.shard(full[n]).to(dt).requires_grad_() for n in ("q", "k", "v"))
    docs = op.shard(full["docs"]) if case.docs else None
    for ledger in ledgers:
        ledger.reset()
    out = op(q, k, v, AttentionMeta(document_ids=docs, causal=case.causal))
    fwd = merged_snapshot(ledgers)
    for ledger in ledgers:
        ledger.reset()
    out.backward(op.shard(full["dout"]).to(dt))
    bwd = merged_snapshot(ledgers)
    return dict(rank=op.sp_rank, out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad, fwd=fwd, bwd=bwd)


def run_cases(cases: list[Case]) -> list[dict]:
    groups = Groups(sorted({c.ulysses for c in cases if c.method == "usp"}))
    try:
        return [_run_case(c, groups) for c in cases]
    finally:
        groups.close()


def _run(cases: list[Case], p: int) -> list[list[dict]]:
    """results[i][rank] for case i."""
    per_rank = [run_cases(cases)] if p == 1 else run_distributed(run_cases, p, cases, timeout=240)
    return [[per_rank[r][i] for r in range(p)] for i in range(len(cases))]


def _unshard(case: Case, shards: list[dict], key: str) -> torch.Tensor:
    ordered = sorted(shards, key=lambda s: s["rank"])
    return unshard_sequence([s[key].to(torch.float64) for s in ordered], case.method, dim=1, ulysses_degree=case.ulysses)


def expected_comm(case: Case, p: int, rank: int = 0) -> tuple[dict, dict]:
    """Analytic calls and bytes per (group/op) for forward and backward, of group rank `rank`."""
    e = case.torch_dtype.itemsize
    a = 8 if case.dtype == "float64" else 4
    sl = case.tokens_per_rank
    fwd: dict = {}
    bwd: dict = {}

    def add(table, key, calls, nbytes):
        if calls:
            table[key] = {"calls": calls, "bytes": nbytes}

    def ulysses(name, pu):
        if pu == 1:
            return case.h_kv
        h_kv = case.h_kv if case.h_kv % pu == 0 else pu
        per = B * sl * (2 * H + 2 * h_kv) * D * e
        add(fwd, f"{name}/all_to_all", 4, per)
        add(bwd, f"{name}/all_to_all", 4, per)
        if case.docs:
            add(fwd, f"{name}/all_gather", 1, B * sl * 8)
        return h_kv

    def ring(name, pr, s, h, h_kv):
        if pr == 1:
            return
        kv = 2 * B * h_kv * s * D
        for kind in ("send", "recv"):
            add(fwd, f"{name}/{kind}", pr - 1, (pr - 1) * kv * e)
            add(bwd, f"{name}/{kind}", 2 * pr - 1, (pr - 1) * kv * e + pr * kv * a)
        if case.docs:
            add(fwd, f"{name}/all_gather", 1, B * s * 8)

    def tokenring(name, pr, s):
        if pr == 1:
            return
        # only the query rows a peer needs travel (tokenring_comm.py; tests/test_tokenring_zigzag.py
        # checks that route against the closed-form zigzag count)
        route = build_route([shard_segments("tokenring", s * pr, pr, i) for i in range(pr)], case.causal)
        table = tokenring_bytes(route, rank, B, H, D, e, a)
        for kind in ("send", "recv"):
            add(fwd, f"{name}/{kind}", *table["forward"][kind])
            add(bwd, f"{name}/{kind}", *table["backward"][kind])
        if case.docs:
            add(fwd, f"{name}/all_gather", 1, B * s * 8)

    if case.method == "ulysses":
        ulysses("sp", p)
    elif case.method == "ring":
        ring("sp", p, sl, H, case.h_kv)
    elif case.method == "tokenring":
        tokenring("sp", p, sl)
    elif case.method == "usp":
        pu = case.ulysses
        h_kv = ulysses("ulysses", pu)
        ring("ring", p // pu, sl * pu, H // pu, h_kv // pu)
    return fwd, bwd


def _single_bf16(full: dict, causal: bool) -> dict:
    q, k, v = (full[n].to(torch.bfloat16).requires_grad_() for n in ("q", "k", "v"))
    out = local_attention(q, k, v, AttentionMeta(document_ids=full["docs"], causal=causal))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), full["dout"].to(torch.bfloat16))
    return dict(out=out, dq=dq, dk=dk, dv=dv)


def check_case(case: Case, p: int, shards: list[dict]) -> None:
    full = make_inputs(case, p)
    ref = reference_with_grads(full, case.causal)
    single = _single_bf16(full, case.causal) if case.dtype == "bfloat16" else None
    for key in ("out", "dq", "dk", "dv"):
        got = _unshard(case, shards, key)
        if single is None:
            torch.testing.assert_close(got, ref[key], **FP64_TOL, msg=lambda m: f"{case} {key}: {m}")
        else:
            err = (got - ref[key]).abs()
            base = (single[key].double() - ref[key]).abs()
            assert err.max() <= 2 * base.max(), f"{case} {key}: max err {err.max():.3g} vs single bf16 {base.max():.3g}"
            assert err.mean() <= 2 * base.mean(), f"{case} {key}: mean err {err.mean():.3g} vs single {base.mean():.3g}"
    for shard in shards:
        fwd, bwd = expected_comm(case, p, shard["rank"])
        assert shard["fwd"] == fwd, f"{case} forward traffic {shard['fwd']} != {fwd}"
        assert shard["bwd"] == bwd, f"{case} backward traffic {shard['bwd']} != {bwd}"


@pytest.mark.parametrize("p", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_every_method_matches_single_process_reference(p):
    cases = _cases(p)
    methods = {c.method for c in cases}
    assert {"ring", "tokenring", "ulysses"} <= methods and (p == 1 or "usp" in methods)
    for case, shards in zip(cases, _run(cases, p)):
        check_case(case, p, shards)


@pytest.mark.slow
def test_eight_ranks_ring_and_tokenring():
    cases = [Case(m, causal, 2, docs, "float64", tokens_per_rank=4) for m in ("ring", "tokenring")
             for causal, docs in ((True, True), (False, False), (True, False))]
    cases += [Case("usp", True, 2, True, "float64", ulysses=2, tokens_per_rank=4)]
    for case, shards in zip(cases, _run(cases, 8)):
        check_case(case, 8, shards)


# --- token-level causality probe --------------------------------------------------------------
def _probe(cases: list[Case], j: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    groups = Groups(sorted({c.ulysses for c in cases if c.method == "usp"}))
    results = []
    for case in cases:
        op, _ = groups.op(case)
        full = make_inputs(case, op.sp_size)
        outs = []
        for bump in (0.0, 1.0, 0.0):  # the repeat checks run-to-run determinism
            q, k, v = (full[n].clone() for n in ("q", "k", "v"))
            for t in (q, k, v):
                t[:, j] += bump
            meta = AttentionMeta(causal=True)
            outs.append(op(op.shard(q), op.shard(k), op.shard(v), meta))
        results.append((op.sp_rank, *outs))
    groups.close()
    return results


@pytest.mark.slow  # long sequences at several P (the fp64 equivalence tests cover causality at small N)
def test_token_causality_probe_and_determinism():
    """Perturbing token j changes no output before j, and does change the output at j; a repeated
    call on the same inputs gives bit-identical outputs (fixed merge order)."""
    p, j = 4, 13  # j sits inside a zigzag chunk of rank 1 and in a usp piece
    cases = [Case(m, h_kv=2, ulysses=2 if m == "usp" else None) for m in ("ring", "tokenring", "ulysses", "usp")]
    per_rank = run_distributed(_probe, p, cases, j)
    for i, case in enumerate(cases):
        ranked = sorted((per_rank[r][i] for r in range(p)), key=lambda t: t[0])
        before = unshard_sequence([t[1] for t in ranked], case.method, 1, case.ulysses)
        after = unshard_sequence([t[2] for t in ranked], case.method, 1, case.ulysses)
        assert torch.equal(before[:, :j], after[:, :j]), case
        assert not torch.allclose(before[:, j], after[:, j]), case
        again = unshard_sequence([t[3] for t in ranked], case.method, 1, case.ulysses)
        assert torch.equal(before, again), f"{case}: same inputs gave different bits"


# --- repeated calls: no hang, no leak -----------------------------------------------------------
def _repeat_calls(n_calls: int) -> dict:
    groups = Groups([2])
    probes = []
    for i in range(n_calls + 20):
        case = Case(("ring", "tokenring", "ulysses", "usp")[i % 4], causal=True, h_kv=2, docs=i % 2 == 0, ulysses=2)
        op, _ = groups.op(case)
        full = make_inputs(case, op.sp_size, seed=i)
        q, k, v = (op.shard(full[n]).requires_grad_() for n in ("q", "k", "v"))
        out = op(q, k, v, AttentionMeta(op.shard(full["docs"]) if case.docs else None, True))
        out.sum().backward()
        if i in (19, n_calls + 19):
            probes.append((threading.active_count(), len(os.listdir("/proc/self/fd"))))
    groups.close()
    return dict(threads=[t for t, _ in probes], fds=[f for _, f in probes])


@pytest.mark.slow  # many calls in a row
def test_repeated_calls_do_not_hang_or_leak():
    for res in run_distributed(_repeat_calls, 2, 200, timeout=240):
        assert res["threads"][0] == res["threads"][1], res
        assert res["fds"][0] == res["fds"][1], res


@pytest.mark.slow  # P up to 8
def test_bf16_error_does_not_grow_with_p():
    """Same 64-token problem on P = 2, 4, 8: the bf16 error against fp64 must not grow with P (partials
    are computed and merged in fp32, so it should stay at the final-rounding level). The bound P/2 x
    the P=2 error is the 'not super-linear' criterion of the reference note; real growth from bf16
    partials would break it at P=8."""
    n = 64
    errors = {}
    for p in (2, 4, 8):
        cases = [Case(m, True, 2, True, "bfloat16", tokens_per_rank=n // p) for m in ("ring", "tokenring")]
        for case, shards in zip(cases, _run(cases, p)):
            ref = reference_with_grads(make_inputs(case, p), case.causal)
            for key in ("out", "dq", "dk", "dv"):
                errors[(case.method, key, p)] = (_unshard(case, shards, key) - ref[key]).abs().max().item()
    for (method, key, p), err in errors.items():
        assert err <= max(1, p / 2) * errors[(method, key, 2)], (method, key, p, err, errors[(method, key, 2)])
