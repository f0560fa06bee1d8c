"""LASP-2 (meshweave.attention.lasp2) and the LASP-1 chain peer over P gloo ranks against the fp64 oracle, and their traffic.

Each world size runs all its cases in one distributed task; every rank returns its shards of out, dq, dk, dv and
what its ledger saw, and the parent unshards them with the layout and compares with the O(N^2) reference at
1e-10 (fp64: only rounding separates them; a missing carried state, a reset in the wrong place or a state
taken from the wrong segment is an O(1) error). Layouts: contiguous (ulysses), zigzag (ring), usp's pieces.
Documents: none; random (incl. a 1-token document at the end); boundaries exactly on every shard and chunk edge
with 1-token documents there; and a few long documents that run across several shards.

Traffic: per layer exactly one all_gather in forward and one in backward, of n_seg x B x H x Dk x Dv values
(n_seg = segments per rank, doubled bidirectional), plus one all_gather of boundary ids per batch with
documents; the same bytes at N = 1K, 8K and 64K.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from meshweave.attention import unshard_sequence
from meshweave.attention.lasp1 import lasp1_op
from meshweave.attention.lasp2 import LinearSequenceParallel
from meshweave.attention.layout import shard_sequence
from meshweave.attention.linear import linear_attention_reference
from meshweave.core.comm import CommGroup, CommLedger, single_process_group
from meshweave.models.attention_api import AttentionMeta
from meshweave.models.linear_attention import head_log_decay
from meshweave.testing import run_distributed
from tests.attention_helpers import make_documents

TOL = dict(atol=1e-10, rtol=1e-10)
B, H, H_KV, DK, DV = 2, 4, 2, 8, 6


@dataclass(frozen=True)
class Case:
    method: str  # layout: ulysses = contiguous, ring = zigzag, usp
    causal: bool = True
    decay: str = "none"
    docs: str = "none"  # none | random | aligned | long
    tokens_per_rank: int = 16
    ulysses: int | None = None
    chunk: int = 4
    algo: str = "lasp2"  # or "lasp1": the chain peer (contiguous, causal)

    def n(self, p: int) -> int:
        return self.tokens_per_rank * p


def _documents(kind: str, n: int, p: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "random":
        return make_documents(B, n, 11)
    starts = torch.zeros(B, n, dtype=torch.long)
    if kind == "aligned":  # a boundary on every zigzag chunk edge (so on every shard edge of every layout)
        edge = n // (2 * p)
        starts[:, edge::edge] = 1
        starts[0, 1] = 1  # a 1-token document at the very start of row 0
        starts[1, edge + 1] = 1  # and one right after a shard edge in row 1
        if n > 2 * edge:
            starts[0, 2 * edge - 1] = 1  # and one ending exactly on a shard edge
    else:  # long: documents spanning several shards, boundaries inside shards
        starts[0, n // 3 + 1] = 1
        starts[1, [n // 5 + 2, (3 * n) // 4 - 1]] = 1
    return torch.cumsum(starts, 1)


def _full_inputs(case: Case, p: int, seed: int = 0) -> dict:
    n = case.n(p)
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    return dict(q=rnd(B, n, H, DK), k=rnd(B, n, H_KV, DK), v=rnd(B, n, H_KV, DV), dout=rnd(B, n, H, DV),
                docs=_documents(case.docs, n, p))


def _group() -> CommGroup:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return single_process_group("sp")
    ranks = list(range(dist.get_world_size()))
    return CommGroup("sp", dist.new_group(ranks), ranks, CommLedger())


def _shard(case: Case, x: torch.Tensor | None, p: int, rank: int) -> torch.Tensor | None:
    return None if x is None else shard_sequence(x, case.method, rank, p, 1, case.ulysses)


def run_cases(cases: list[Case]) -> list[dict]:
    group = _group()
    p, rank, out = group.size, group.rank, []
    for case in cases:
        op = (lasp1_op(group, case.chunk) if case.algo == "lasp1"
              else LinearSequenceParallel(group, case.method, case.ulysses, chunk=case.chunk))
        full = _full_inputs(case, p)
        q, k, v = (_shard(case, full[name], p, rank).requires_grad_() for name in ("q", "k", "v"))
        meta = AttentionMeta(_shard(case, full["docs"], p, rank), case.causal)
        log_decay = head_log_decay(case.decay, H)
        group.ledger.reset()
        first = op(q, k, v, meta, log_decay)  # layer 1: gathers boundary ids once per batch
        per_batch = group.ledger.snapshot()
        group.ledger.reset()
        second = op(q, k, v, meta, log_decay)  # layer 2: the per-layer traffic only
        fwd = group.ledger.snapshot()
        group.ledger.reset()
        grads = torch.autograd.grad(second, (q, k, v), _shard(case, full["dout"], p, rank))
        bwd = group.ledger.snapshot()
        assert torch.equal(first, second)
        out.append(dict(rank=rank, out=second.detach(), dq=grads[0], dk=grads[1], dv=grads[2], per_batch=per_batch,
                        fwd=fwd, bwd=bwd))
    return out


def _run(cases: list[Case], p: int) -> list[list[dict]]:
    per_rank = [run_cases(cases)] if p == 1 else run_distributed(run_cases, p, cases, timeout=300)
    return [[per_rank[r][i] for r in range(p)] for i in range(len(cases))]


def segments_per_rank(case: Case, p: int) -> int:
    from meshweave.attention.lasp2 import segment_layout

    return max(len(s) for s in segment_layout(case.method, case.n(p), p, case.ulysses))


def state_bytes(case: Case, p: int) -> int:
    """Per rank and layer, each way: the memory states of this rank's segments (both directions if bidirectional)."""
    return segments_per_rank(case, p) * (1 if case.causal else 2) * B * H * DK * DV * 8


def check(case: Case, p: int, shards: list[dict]) -> None:
    full = _full_inputs(case, p)
    q, k, v = (full[name].clone().requires_grad_() for name in ("q", "k", "v"))
    want_out = linear_attention_reference(q, k, v, head_log_decay(case.decay, H), full["docs"], case.causal)
    want = dict(out=want_out.detach(), **dict(zip(("dq", "dk", "dv"),
                                                   torch.autograd.grad(want_out, (q, k, v), full["dout"]))))
    ordered = sorted(shards, key=lambda s: s["rank"])
    for key in ("out", "dq", "dk", "dv"):
        got = unshard_sequence([s[key] for s in ordered], case.method, 1, case.ulysses)
        torch.testing.assert_close(got, want[key], **TOL, msg=lambda m: f"{case} {key}: {m}")
    if p == 1:
        assert all(s["fwd"] == s["bwd"] == s["per_batch"] == {} for s in shards), f"{case}: a group of one communicates"
        return
    ids = {"sp/all_gather": {"calls": 1, "bytes": segments_per_rank(case, p) * B * 3 * 8}} if case.docs != "none" else {}
    for s in shards:
        fwd, bwd = expected_layer_traffic(case, p, s["rank"])
        assert s["fwd"] == fwd and s["bwd"] == bwd, f"{case}: per-layer traffic {s['fwd']} / {s['bwd']} != {fwd} / {bwd}"
        first = {key: {"calls": fwd.get(key, {}).get("calls", 0) + ids.get(key, {}).get("calls", 0),
                       "bytes": fwd.get(key, {}).get("bytes", 0) + ids.get(key, {}).get("bytes", 0)}
                 for key in set(fwd) | set(ids)}
        assert s["per_batch"] == first, f"{case}: first layer's traffic {s['per_batch']} != {first}"


def expected_layer_traffic(case: Case, p: int, rank: int) -> tuple[dict, dict]:
    """LASP-2: one all_gather of the states each way. LASP-1: one state per hop, rank r -> r+1 forward,
    r -> r-1 backward."""
    if case.algo == "lasp2":
        layer = {"sp/all_gather": {"calls": 1, "bytes": state_bytes(case, p)}}
        return layer, layer
    hop = {"calls": 1, "bytes": B * H * DK * DV * 8}
    first, last = rank == 0, rank == p - 1
    fwd = {**({} if last else {"sp/send": hop}), **({} if first else {"sp/recv": hop})}
    bwd = {**({} if first else {"sp/send": hop}), **({} if last else {"sp/recv": hop})}
    return fwd, bwd


def _cases(p: int) -> list[Case]:
    layouts = [("ulysses", None), ("ring", None)] + ([("usp", 2)] if p == 4 else [])
    cases = [Case(m, causal, decay, docs, ulysses=u)
             for m, u in layouts for causal in (True, False) for decay in ("none", "alibi")
             for docs in ("none", "random", "aligned", "long")]
    cases.append(Case("ring", True, "retnet", "random", tokens_per_rank=20, chunk=3))  # chunks not dividing segments
    cases += [Case("ulysses", True, decay, docs, algo="lasp1") for decay in ("none", "alibi")
              for docs in ("none", "aligned", "long")]
    return cases


@pytest.mark.parametrize("p", [1, 2, pytest.param(4, marks=pytest.mark.slow)])
def test_lasp2_matches_single_process_reference(p):
    cases = _cases(p)
    for case, shards in zip(cases, _run(cases, p)):
        check(case, p, shards)


@pytest.mark.slow
def test_lasp2_on_eight_ranks():
    cases = [Case("ulysses", True, "alibi", "long", tokens_per_rank=4), Case("ring", True, "alibi", "aligned", 4),
             Case("ring", False, "none", "random", 4), Case("usp", True, "retnet", "long", 4, ulysses=2)]
    for case, shards in zip(cases, _run(cases, 8)):
        check(case, 8, shards)


# --- bytes independent of the sequence length ---------------------------------------------------------------
def traffic_at_lengths(lengths: list[int]) -> list[tuple[dict, dict]]:
    group = _group()
    p, out = group.size, []
    for n in lengths:
        op = LinearSequenceParallel(group, "ring", chunk=64)
        gen = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, n // p, 2, 16, generator=gen).requires_grad_() for _ in range(3))
        meta = AttentionMeta(None, True)
        op.plan(n, meta)
        group.ledger.reset()
        y = op(q, k, v, meta, head_log_decay("alibi", 2))
        fwd = group.ledger.snapshot()
        group.ledger.reset()
        y.sum().backward()
        out.append((fwd, group.ledger.snapshot()))
    return out


def test_lasp2_bytes_do_not_depend_on_sequence_length():
    per_length = run_distributed(traffic_at_lengths, 2, [1024, 8192, 65536], timeout=300)[0]
    want = {"sp/all_gather": {"calls": 1, "bytes": 2 * 1 * 2 * 16 * 16 * 4}}  # 2 zigzag segments, fp32 states
    assert all(fwd == want and bwd == want for fwd, bwd in per_length), per_length
