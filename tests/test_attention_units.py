"""Single-process pieces of the attention layer: kernels, merge, block masks, layouts, validation."""

from __future__ import annotations

import pytest
import torch

from meshweave.attention import (
    METHODS, block_backward, block_forward, merge_partials, shard_segments, shard_sequence, unshard_sequence,
    usp_rank_groups, validate_sp,
)
from meshweave.attention import masks
from meshweave.attention.masks import CAUSAL, FULL, plan_block, positions
from tests.attention_helpers import make_documents

TIGHT = dict(atol=1e-12, rtol=1e-12)  # fp64 vs fp64: only rounding differs


def _math_ref(q, k, v, visible):
    """Reference (out, lse) in (B, H, S, D) layout with an explicit (.., Sq, Sk) visibility mask."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~visible, float("-inf"))
    lse = s.logsumexp(-1)
    p = torch.where(torch.isneginf(lse)[..., None], torch.zeros_like(s), (s - lse[..., None]).exp())
    return p @ v, lse


@pytest.mark.parametrize("backend", ["cpu_flash", "math"])
@pytest.mark.parametrize("kind", ["full", "causal", "explicit"])
def test_kernel_out_lse_and_grads_with_global_normalisation(backend, kind):
    """Block backward with the *global* out/lse of two key blocks sums to the full gradient."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 6, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 12, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 12, 8, dtype=torch.float64, requires_grad=True)
    masks = {"full": FULL, "causal": CAUSAL}
    visible = torch.rand(2, 1, 6, 12) > 0.4
    visible[:, :, 2] = False  # a query row that sees nothing
    visible[:, :, 3, :6] = False  # a row that sees keys only in the second block
    halves = [slice(0, 6), slice(6, 12)]
    if kind == "explicit":
        block_masks, full_vis = [visible[..., h] for h in halves], visible
    elif kind == "causal":
        # queries are positions 6..11: keys 6..11 are the causal diagonal, keys 0..5 fully visible
        block_masks = [CAUSAL, FULL]
        halves = [slice(6, 12), slice(0, 6)]
        full_vis = torch.cat([torch.ones(6, 6, dtype=torch.bool), torch.ones(6, 6, dtype=torch.bool).tril()], 1)
    else:
        block_masks, full_vis = [masks["full"]] * 2, torch.ones(6, 12, dtype=torch.bool)
    ref_out, ref_lse = _math_ref(q, k, v, full_vis)
    parts = [block_forward(q, k[:, :, h], v[:, :, h], m, 8 ** -0.5, backend) for h, m in zip(halves, block_masks)]
    out, lse = merge_partials(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    rows = ~torch.isneginf(ref_lse)
    torch.testing.assert_close(out, ref_out, **TIGHT)
    torch.testing.assert_close(lse[rows], ref_lse[rows], **TIGHT)
    assert not out.isnan().any() and torch.isneginf(lse[~rows]).all()
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(ref_out, (q, k, v), dout)
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for h, m in zip(halves, block_masks):
        gq, gk, gv = block_backward(dout, q, k[:, :, h], v[:, :, h], out, lse, m, 8 ** -0.5, backend)
        dq += gq
        dk[:, :, h] += gk
        dv[:, :, h] += gv
    for got, want in zip((dq, dk, dv), grads):
        torch.testing.assert_close(got, want, **TIGHT)


def test_cpu_kernel_accepts_bf16_and_keeps_fp32_partials():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 8).bfloat16() for _ in range(3))
    out, lse = block_forward(q, k, v, CAUSAL, 8 ** -0.5, "cpu_flash")
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    ref, ref_lse = _math_ref(q.double(), k.double(), v.double(), torch.ones(5, 5, dtype=torch.bool).tril())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)  # fp32 compute on exact bf16 inputs


def test_merge_any_split_and_order_equals_full_softmax():
    torch.manual_seed(0)
    s = torch.randn(3, 5, 20, dtype=torch.float64) * 5
    v = torch.randn(20, 4, dtype=torch.float64)
    full_out, full_lse = s.softmax(-1) @ v, s.logsumexp(-1)
    for cuts in ([7], [1, 13], [3, 4, 19]):
        bounds = [0, *cuts, 20]
        parts = [(s[..., a:b].softmax(-1) @ v[a:b], s[..., a:b].logsumexp(-1)) for a, b in zip(bounds, bounds[1:])]
        for order in (parts, parts[::-1]):
            out, lse = order[0]
            for o, l in order[1:]:
                out, lse = merge_partials(out, lse, o, l)
            torch.testing.assert_close(out, full_out, **TIGHT)
            torch.testing.assert_close(lse, full_lse, **TIGHT)


def test_merge_empty_rows_and_extreme_logits():
    empty = torch.tensor([float("-inf")] * 2)
    o = torch.ones(2, 3)
    out, lse = merge_partials(torch.zeros(2, 3), empty, torch.zeros(2, 3), empty)
    assert torch.isneginf(lse).all() and (out == 0).all()  # both empty: no NaN
    out, lse = merge_partials(torch.zeros(2, 3), empty, o, torch.tensor([1.0, 2.0]))
    assert torch.equal(out, o) and torch.equal(lse, torch.tensor([1.0, 2.0]))
    big = torch.tensor([1e4, -1e4])  # fp32 exp would overflow / underflow; logsigmoid must not
    out, lse = merge_partials(o, big, 2 * o, big)
    torch.testing.assert_close(lse, big + torch.log(torch.tensor(2.0)))
    torch.testing.assert_close(out, 1.5 * o)
    out, lse = merge_partials(o, torch.tensor([1e4, 0.0]), 2 * o, torch.tensor([0.0, 1e4]))
    torch.testing.assert_close(out, torch.tensor([[1.0] * 3, [2.0] * 3]))
    assert torch.isfinite(lse).all()


def _dense_visibility(q_segs, k_segs, causal, q_docs, k_docs):
    qp, kp = positions(q_segs), positions(k_segs)
    vis = (kp[None] <= qp[:, None]) if causal else torch.ones(len(qp), len(kp), dtype=torch.bool)
    vis = vis[None].expand(q_docs.shape[0] if q_docs is not None else 1, -1, -1)
    if q_docs is not None:
        vis = vis & (q_docs[:, :, None] == k_docs[:, None, :])
    return vis


def _covered(calls, sq, sk, batch):
    cover = torch.zeros(batch, sq, sk, dtype=torch.int64)
    for c in calls:
        rows, cols = c.q_rows, c.k_rows
        nq, nk = rows.stop - rows.start, cols.stop - cols.start
        rows_b = range(batch)[c.batch]
        if isinstance(c.mask, torch.Tensor):
            m = c.mask[:, 0]
            assert m.any(), "a planned call must see at least one key"
        elif c.mask == CAUSAL:
            m = torch.ones(nq, nk, dtype=torch.bool).tril()[None]
        else:
            m = torch.ones(nq, nk, dtype=torch.bool)[None]
        cover[c.batch, rows, cols] += m.expand(len(rows_b), -1, -1).long()
    return cover


@pytest.mark.parametrize("max_doc_calls", [32, 2])  # 2 forces the dense-mask fallback for documents
@pytest.mark.parametrize("p", [2, 4])
def test_block_plans_cover_exactly_the_visible_pairs(p, max_doc_calls, monkeypatch):
    """For every (q shard, kv shard) pair of every layout: each visible pair once, nothing else."""
    monkeypatch.setattr(masks, "MAX_DOCUMENT_CALLS", max_doc_calls)
    n = 16 * p
    docs = make_documents(2, n, seed=3)
    for method, u in (("ring", None), ("ulysses", None), ("usp", 2)):
        segs = [shard_segments(method, n, p, r, u) for r in range(p)]
        idx = [positions(s) for s in segs]
        for causal in (True, False):
            for with_docs in (False, True):
                for i in range(p):
                    for j in range(p):
                        qd = docs[:, idx[i]] if with_docs else None
                        kd = docs[:, idx[j]] if with_docs else None
                        calls = plan_block(segs[i], segs[j], causal, qd, kd)
                        want = _dense_visibility(segs[i], segs[j], causal, qd, kd)
                        got = _covered(calls, len(idx[i]), len(idx[j]), want.shape[0])
                        assert torch.equal(got, want.long().expand_as(got)), (method, causal, with_docs, i, j)


def test_document_plans_use_flash_paths_without_dense_masks():
    """A few packed documents give FULL/CAUSAL calls per document run (varlen-style, no dense mask);
    rows with identical documents share one batched call; very many documents fall back to one mask."""
    p, n = 2, 32
    segs = [shard_segments("ring", n, p, r) for r in range(p)]
    idx = [positions(s) for s in segs]
    docs = torch.tensor([[0] * 5 + [1] * 14 + [2] * 13] * 2)
    for i in range(p):
        for j in range(p):
            calls = plan_block(segs[i], segs[j], True, docs[:, idx[i]], docs[:, idx[j]])
            assert all(isinstance(c.mask, str) and c.batch == slice(0, 2) for c in calls), calls
    long_segs = shard_segments("ring", 160, p, 0)  # 40-token chunks
    many = torch.arange(160).repeat(2, 1)  # 1-token documents: 40 runs per chunk > MAX_DOCUMENT_CALLS
    local = many[:, positions(long_segs)]
    calls = plan_block(long_segs, long_segs, True, local, local)
    assert any(isinstance(c.mask, torch.Tensor) for c in calls)


def test_zigzag_plan_matches_the_balanced_schedule():
    """Causal zigzag: diagonal = one causal call; s <= r: all queries x first kv half; s > r: second q half."""
    p, n = 4, 32
    segs = [shard_segments("ring", n, p, r) for r in range(p)]
    assert plan_block(segs[2], segs[2], True)[0].mask == CAUSAL
    (call,) = plan_block(segs[2], segs[1], True)
    assert (call.q_rows, call.k_rows, call.mask) == (slice(0, 8), slice(0, 4), FULL)
    (call,) = plan_block(segs[1], segs[2], True)
    assert (call.q_rows, call.k_rows, call.mask) == (slice(4, 8), slice(0, 8), FULL)


@pytest.mark.parametrize("method,u", [(m, None) for m in METHODS if m not in ("usp", "local")] + [("usp", 1), ("usp", 2), ("usp", 4)])
def test_layout_round_trip_and_same_permutation_for_every_tensor(method, u):
    p, n = 4, 32
    tokens = torch.arange(n)[None].expand(3, -1) * 10
    pos = torch.arange(n)[None].expand(3, -1)
    hidden = torch.randn(3, n, 5)
    shards = [shard_sequence(tokens, method, r, p, 1, u) for r in range(p)]
    assert torch.equal(unshard_sequence(shards, method, 1, u), tokens)
    assert torch.equal(unshard_sequence([shard_sequence(hidden, method, r, p, 1, u) for r in range(p)], method, 1, u), hidden)
    for r in range(p):  # positions and tokens follow the same permutation; segments describe it
        assert torch.equal(shard_sequence(pos, method, r, p, 1, u) * 10, shards[r])
        assert torch.equal(positions(shard_segments(method, n, p, r, u)), shard_sequence(pos, method, r, p, 1, u)[0])
    covered = torch.cat([shard_sequence(pos, method, r, p, 1, u)[0] for r in range(p)]).sort().values
    assert torch.equal(covered, torch.arange(n))


def test_usp_layout_gives_each_ring_rank_its_zigzag_pair():
    p, u, n = 8, 2, 64
    for ring_rank in range(p // u):
        pair = torch.cat([positions(shard_segments("usp", n, p, ring_rank * u + j, u)) for j in range(u)])
        assert torch.equal(pair, positions(shard_segments("ring", n, p // u, ring_rank)))


def test_usp_rank_groups_contiguous_ulysses_and_strided_ring():
    uly, ring = usp_rank_groups([4, 5, 6, 7, 8, 9, 10, 11], 2)
    assert uly == [[4, 5], [6, 7], [8, 9], [10, 11]]
    assert ring == [[4, 6, 8, 10], [5, 7, 9, 11]]
    with pytest.raises(ValueError, match="divide"):
        usp_rank_groups(range(6), 4)


def test_validate_sp_messages_name_field_and_fix():
    assert validate_sp("ulysses", 8, 8, 4, 64) == []
    assert validate_sp("ulysses", 8, 2, 4, 64) == []  # kv heads replicated (4 % 2 == 0)
    (msg,) = validate_sp("ulysses", 6, 3, 4, 64)
    assert msg.startswith("parallel.sp: ulysses needs model.n_heads (6) divisible by sp (4)") and "usp" in msg
    (msg,) = validate_sp("ulysses", 12, 3, 2, 64)
    assert msg.startswith("parallel.sp: ulysses needs model.n_kv_heads (3)") and "ulysses <= 1" in msg
    (msg,) = validate_sp("ring", 4, 2, 4, 36)
    assert msg.startswith("train.seq_len") and "2*sp (8)" in msg
    assert validate_sp("ring", 4, 2, 4, 40) == []
    assert validate_sp("usp", 8, 2, 8, 64, 2) == []
    assert validate_sp("usp", 8, 2, 8, 64, 3)[0].startswith("parallel.usp.ulysses")
    assert validate_sp("usp", 6, 2, 8, 64, 4)[0].startswith("parallel.usp.ulysses")
    assert validate_sp("local", 4, 2, 2, 64)[0].startswith("parallel.sp")
    assert validate_sp("zigzag", 4, 2, 2, 64)[0].startswith("parallel.sp_method")
    assert all("\n" not in m for m in validate_sp("usp", 6, 4, 8, 30, 3))


def test_zigzag_balances_causal_work_across_ranks():
    """Causal ring on the zigzag layout: every rank computes the same number of score entries per step
    (a diagonal block at step 0, exactly half a block afterwards); contiguous would be unbalanced."""
    p, n = 4, 64
    c = n // p

    def area(method, r, owner):
        segs = [shard_segments(method, n, p, i) for i in range(p)]
        calls = plan_block(segs[r], segs[owner], True)
        return sum((x.q_rows.stop - x.q_rows.start) * (x.k_rows.stop - x.k_rows.start) for x in calls)

    for s in range(1, p):
        assert {area("ring", r, (r - s) % p) for r in range(p)} == {c * c // 2}
    assert {area("ring", r, r) for r in range(p)} == {c * c}  # one causal call on the local pair
    assert len({sum(area("ulysses", r, o) for o in range(p)) for r in range(p)}) == p  # contiguous: unbalanced
