"""The single-block path (attention/single_block.py) that a ring of one rank takes: Ulysses after its all-to-all.

Checked in one process (a one-rank Ulysses group needs no process group) against the fp64 reference:
causal, full, GQA, packed documents (one kernel call per document), many tiny documents (one dense-mask
call), and a document id that recurs after another document, where the calls overlap and the ring path
(which merges) must be taken instead. The multi-process equivalence tests (test_attention_sp.py,
test_sp_training.py) cover the all-to-alls around it.
"""

from __future__ import annotations

import pytest
import torch

from meshweave.attention import build_attention_op
from meshweave.attention import ring as ring_module
from meshweave.attention.masks import CAUSAL, FULL, BlockCall
from meshweave.attention.single_block import covers_once
from meshweave.core.comm import single_process_group
from meshweave.models.attention_api import AttentionMeta
from tests.attention_helpers import reference_with_grads

B, S, H, D = 2, 64, 4, 8


def _docs(lengths: list[int], ids: list[int] | None = None) -> torch.Tensor:
    ids = ids if ids is not None else list(range(len(lengths)))
    return torch.repeat_interleave(torch.tensor(ids), torch.tensor(lengths))


DOCS = {
    "none": None,
    "documents": torch.stack([_docs([20, 30, 14]), _docs([1, 5, 58])]),
    "many tiny documents": torch.stack([_docs([2] * 32), _docs([1] * 64)]),  # > MAX_DOCUMENT_CALLS: a dense mask
    "recurring id": torch.stack([_docs([20, 30, 14], [0, 1, 0]), _docs([32, 32])]),  # id 0 twice in row 0
}


def _inputs(h_kv: int, dtype: torch.dtype, docs: torch.Tensor | None) -> dict:
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(torch.float64)

    return {"q": rnd(B, S, H, D), "k": rnd(B, S, h_kv, D), "v": rnd(B, S, h_kv, D), "dout": rnd(B, S, H, D),
            "docs": docs}


def _run_ulysses(x: dict, causal: bool, dtype: torch.dtype, monkeypatch) -> tuple[dict, int]:
    """One-rank Ulysses fwd+bwd in `dtype`; returns results (fp64) and how often the single-block path ran."""
    taken = []
    original = ring_module.single_block_attention
    monkeypatch.setattr(ring_module, "single_block_attention", lambda *a, **k: taken.append(1) or original(*a, **k))
    op = build_attention_op("ulysses", single_process_group("sp"))
    q, k, v = (x[n].to(dtype).requires_grad_() for n in ("q", "k", "v"))
    out = op(q, k, v, AttentionMeta(document_ids=x["docs"], causal=causal))
    out.backward(x["dout"].to(dtype))
    assert out.dtype == dtype
    return {"out": out.detach().double(), "dq": q.grad.double(), "dk": k.grad.double(), "dv": v.grad.double()}, len(taken)


@pytest.mark.parametrize("docs", list(DOCS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("h_kv", [H, 2], ids=["mha", "gqa"])
def test_one_rank_ulysses_matches_reference(docs, causal, h_kv, monkeypatch):
    x = _inputs(h_kv, torch.float64, DOCS[docs])
    got, taken = _run_ulysses(x, causal, torch.float64, monkeypatch)
    assert taken == (0 if docs == "recurring id" else 1), taken  # a recurring id: calls overlap, ring path
    ref = reference_with_grads(x, causal)
    for key in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-10, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_rank_ulysses_in_low_precision_returns_its_dtype(dtype, monkeypatch):
    x = _inputs(2, dtype, DOCS["documents"])
    got, taken = _run_ulysses(x, True, dtype, monkeypatch)
    assert taken == 1
    ref = reference_with_grads(x, True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for key in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(got[key], ref[key], rtol=tol, atol=tol, msg=lambda m, key=key: f"{key}: {m}")


def test_covers_once():
    whole = [BlockCall(slice(0, 8), slice(0, 8), CAUSAL)]
    assert covers_once(whole, 2, 8, 8)
    per_doc = [BlockCall(slice(0, 3), slice(0, 3), CAUSAL, slice(0, 1)), BlockCall(slice(3, 8), slice(3, 8), CAUSAL, slice(0, 1)),
               BlockCall(slice(0, 8), slice(0, 8), CAUSAL, slice(1, 2))]
    assert covers_once(per_doc, 2, 8, 8)
    assert not covers_once(per_doc[:2], 2, 8, 8)  # batch row 1 uncovered
    overlap = [*per_doc, BlockCall(slice(3, 8), slice(0, 3), FULL, slice(0, 1))]  # rows 3..7 twice
    assert not covers_once(overlap, 2, 8, 8)
    assert not covers_once([], 1, 8, 8)


def test_expanded_upstream_gradient(monkeypatch):
    """out.sum().backward() hands the op a dout with stride 0 everywhere (an expanded scalar)."""
    x = _inputs(2, torch.float64, DOCS["documents"])
    x["dout"] = torch.ones((), dtype=torch.float64).expand(B, S, H, D)
    got, taken = _run_ulysses(x, True, torch.float64, monkeypatch)
    assert taken == 1
    ref = reference_with_grads(x, True)
    for key in ("dq", "dk", "dv"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-10, msg=lambda m, key=key: f"{key}: {m}")
