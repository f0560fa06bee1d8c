"""Shared helpers for the attention tests: inputs, fp64 reference, SP groups inside a task."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from meshweave.attention import build_attention_op, usp_rank_groups
from meshweave.core.comm import CommGroup, CommLedger, single_process_group

B, H, D = 2, 4, 8


@dataclass(frozen=True)
class Case:
    method: str
    causal: bool = True
    h_kv: int = H
    docs: bool = False
    dtype: str = "float64"
    ulysses: int | None = None  # usp only
    tokens_per_rank: int = 8

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def make_documents(b: int, n: int, seed: int) -> torch.Tensor:
    """(b, n) document ids with random boundaries (including 1-token documents)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(b):
        cuts = torch.randperm(n - 1, generator=gen)[: max(1, n // 6)] + 1
        starts = torch.zeros(n, dtype=torch.long)
        starts[cuts] = 1
        starts[n - 1] = 1  # the last token alone: a 1-token document
        rows.append(torch.cumsum(starts, 0))
    return torch.stack(rows)


def make_inputs(case: Case, p: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-sequence fp64 q, k, v, dout (rounded to the case dtype) and document ids."""
    n = case.tokens_per_rank * p
    gen = torch.Generator().manual_seed(seed)
    dt = case.torch_dtype

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dt).to(torch.float64)

    return dict(
        q=rnd(B, n, H, D), k=rnd(B, n, case.h_kv, D), v=rnd(B, n, case.h_kv, D), dout=rnd(B, n, H, D),
        docs=make_documents(B, n, seed + 1) if case.docs else None,
    )


def reference(q, k, v, causal: bool, docs: torch.Tensor | None) -> torch.Tensor:
    """Plain single-process attention over the full sequence (computed in the inputs' dtype)."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
    s = torch.einsum("bshd,bthd->bhst", q, k) * q.shape[-1] ** -0.5
    n = q.shape[1]
    visible = torch.ones(n, n, dtype=torch.bool).tril() if causal else torch.ones(n, n, dtype=torch.bool)
    visible = visible[None, None]
    if docs is not None:
        visible = visible & (docs[:, :, None] == docs[:, None, :])[:, None]
    s = s.masked_fill(~visible, float("-inf"))
    return torch.einsum("bhst,bthd->bshd", s.softmax(-1), v)


def reference_with_grads(inputs: dict, causal: bool) -> dict[str, torch.Tensor]:
    q, k, v = (inputs[n].clone().requires_grad_() for n in ("q", "k", "v"))
    out = reference(q, k, v, causal, inputs["docs"])
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), inputs["dout"])
    return dict(out=out.detach(), dq=dq, dk=dk, dv=dv)


class Groups:
    """The SP groups a task needs: "sp" over all ranks, and usp (ulysses, ring) pairs per degree."""

    def __init__(self, usp_degrees=()) -> None:
        self._pgs = []
        world = dist.get_world_size() if dist.is_initialized() else 1
        ranks = list(range(world))
        if world == 1:
            self.sp = single_process_group("sp")
            self.usp = {u: (single_process_group("ulysses"), single_process_group("ring")) for u in usp_degrees}
            return
        self.sp = CommGroup("sp", self._new(ranks), ranks, CommLedger())
        self.usp = {}
        me = dist.get_rank()
        for u in usp_degrees:
            uly_lists, ring_lists = usp_rank_groups(ranks, u)
            uly = [self._new(r) for r in uly_lists]
            ring = [self._new(r) for r in ring_lists]
            i = next(i for i, r in enumerate(uly_lists) if me in r)
            j = next(j for j, r in enumerate(ring_lists) if me in r)
            self.usp[u] = (CommGroup("ulysses", uly[i], uly_lists[i], CommLedger()),
                           CommGroup("ring", ring[j], ring_lists[j], CommLedger()))

    def _new(self, ranks):
        pg = dist.new_group(ranks)
        self._pgs.append(pg)
        return pg

    def op(self, case: Case):
        if case.method == "usp":
            uly, ring = self.usp[case.ulysses]
            return build_attention_op("usp", ulysses_group=uly, ring_group=ring), [uly.ledger, ring.ledger]
        if case.method == "local":
            return build_attention_op("local"), []
        return build_attention_op(case.method, self.sp), [self.sp.ledger]

    def close(self) -> None:
        for pg in self._pgs:
            dist.destroy_process_group(pg)


def merged_snapshot(ledgers) -> dict[str, dict[str, int]]:
    out = {}
    for ledger in ledgers:
        out.update(ledger.snapshot())
    return out
