"""Single-process linear attention (meshweave.models.linear_attention) against the two oracles of
meshweave.attention.linear: the O(N^2) masked form and the step-by-step recurrence, in fp64.

Tolerance 1e-10 (absolute and relative) on outputs and on dq, dk, dv: the kernel and the oracles differ only
by rounding (~1e-14 here), while a wrong mask entry, a missing decay factor or a state that is not reset at a
document boundary changes values at the 1e-2 level. Chunk sizes 1, 5, 8 and 64 put chunk edges before, at and
after document boundaries and make the sequence end mid-chunk (padding).
"""

from __future__ import annotations

import pytest
import torch

from meshweave.attention.linear import linear_attention_recurrent, linear_attention_reference
from meshweave.models.attention_api import AttentionMeta
from meshweave.models.linear_attention import (
    FEATURE_MAPS,
    apply_feature_map,
    document_runs,
    head_log_decay,
    incoming_states,
    incoming_states_backward,
    linear_scan,
    local_linear_attention,
)
from tests.attention_helpers import make_documents

TOL = dict(atol=1e-10, rtol=1e-10)
B, S, H, H_KV, DK, DV = 2, 37, 4, 2, 8, 6


def _inputs(seed: int = 0, dtype=torch.float64, s: int = S, docs: bool = True):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

    q, k, v = rnd(B, s, H, DK), rnd(B, s, H_KV, DK), rnd(B, s, H_KV, DV)
    dout = torch.randn(B, s, H, DV, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v, dout, (make_documents(B, s, seed + 1) if docs else None)


def _with_grads(fn, q, k, v, dout):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
@pytest.mark.parametrize("decay", ["none", "alibi", "retnet"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "packed"])
def test_chunked_kernel_matches_both_oracles(chunk, decay, causal, docs):
    q, k, v, dout, ids = _inputs(docs=docs)
    log_decay = head_log_decay(decay, H)
    got = _with_grads(lambda *t: local_linear_attention(*t, AttentionMeta(ids, causal), log_decay, chunk=chunk),
                      q, k, v, dout)
    for oracle in (linear_attention_reference, linear_attention_recurrent):
        want = _with_grads(lambda *t: oracle(*t, log_decay, ids, causal), q, k, v, dout)
        for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
            torch.testing.assert_close(g, w, **TOL, msg=lambda m: f"{oracle.__name__} {name}: {m}")


def test_the_oracles_agree_with_each_other():
    q, k, v, _, ids = _inputs(3)
    for causal in (True, False):
        torch.testing.assert_close(linear_attention_reference(q, k, v, head_log_decay("alibi", H), ids, causal),
                                   linear_attention_recurrent(q, k, v, head_log_decay("alibi", H), ids, causal), **TOL)


@pytest.mark.parametrize("j", [13, 16, 21])
def test_token_causality_inside_a_chunk(j):
    """Perturb k_j and v_j: every output before j is bitwise unchanged, also inside j's chunk (the leak the
    reference code's block-causal kernel has), and outputs from j on (same document) do change."""
    q, k, v, _, _ = _inputs(5, docs=False)
    meta = AttentionMeta(None, True)
    base = local_linear_attention(q, k, v, meta, head_log_decay("alibi", H), chunk=8).detach()
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, j] += 1.0
    v2[:, j] -= 1.0
    bumped = local_linear_attention(q.detach(), k2, v2, meta, head_log_decay("alibi", H), chunk=8)
    assert torch.equal(bumped[:, :j], base[:, :j])
    assert (bumped[:, j:] - base[:, j:]).abs().amax(dim=(0, 2, 3)).min() > 1e-6


def test_state_resets_at_every_document_boundary():
    """A token's output depends on nothing outside its document: zeroing the other documents changes nothing."""
    q, k, v, _, ids = _inputs(7)
    meta = AttentionMeta(ids, True)
    out = local_linear_attention(q, k, v, meta, head_log_decay("retnet", H), chunk=8).detach()
    row, doc = 0, int(ids[0, S // 2])
    inside = (ids[row] == doc)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[row, ~inside], v2[row, ~inside] = 0.0, 0.0
    out2 = local_linear_attention(q.detach(), k2, v2, meta, head_log_decay("retnet", H), chunk=8)
    assert torch.equal(out2[row, inside], out[row, inside])


def test_fp32_and_bf16_inputs_keep_fp32_states():
    q, k, v, _, ids = _inputs(9)
    log_decay = head_log_decay("alibi", H)
    want = linear_attention_reference(q, k, v, log_decay, ids).detach()
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        low = [t.detach().to(dtype) for t in (q, k, v)]
        out = local_linear_attention(*low, AttentionMeta(ids, True), log_decay, chunk=8)
        assert out.dtype == dtype
        exact = linear_attention_reference(*(t.double() for t in low), log_decay, ids)  # same rounded inputs
        err = (out.double() - exact).abs().max() / exact.abs().max()
        assert err < tol, f"{dtype}: relative error {err:.3g}"
    assert want.dtype == torch.float64


def test_scan_and_its_transpose():
    gen = torch.Generator().manual_seed(0)
    n = 11
    a, cont = torch.rand(2, 3, n, generator=gen, dtype=torch.float64), (torch.rand(2, 1, n, generator=gen) > 0.3).double()
    cont[..., 0] = 0
    a = a * cont
    x = torch.randn(2, 3, n, 4, 5, generator=gen, dtype=torch.float64)
    s, want = torch.zeros(2, 3, 4, 5, dtype=torch.float64), []
    for b in range(n):
        s = a[..., b, None, None] * s + x[..., b, :, :]
        want.append(s)
    torch.testing.assert_close(linear_scan(a, x), torch.stack(want, dim=2), **TOL)
    xr = x.clone().requires_grad_()
    e = incoming_states(a, cont, xr)
    g = torch.randn_like(e)
    (auto,) = torch.autograd.grad(e, xr, g)
    torch.testing.assert_close(incoming_states_backward(a, cont, g), auto, **TOL)


def test_document_runs_and_feature_maps():
    ids = torch.tensor([[4, 4, 5, 5, 5, 9], [0, 1, 2, 2, 2, 2]])
    assert document_runs(ids).tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]]
    x = torch.linspace(-2, 2, 9)
    assert set(FEATURE_MAPS) == {"identity", "elu1", "relu", "silu"}
    assert (apply_feature_map("elu1", x) > 0).all() and torch.equal(apply_feature_map("identity", x), x)
    with pytest.raises(ValueError, match="unknown feature map"):
        apply_feature_map("cosine", x)
    assert head_log_decay("none", 4) is None
    for kind in ("alibi", "retnet"):
        g = head_log_decay(kind, 8)
        assert g.shape == (8,) and (g < 0).all()
    with pytest.raises(ValueError, match="unknown decay"):
        head_log_decay("xpos", 4)
