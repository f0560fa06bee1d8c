"""A second model kind for the tests, registered at import: "alternating".

It is the Llama decoder whose odd layers take a different token-mixing op kind, "mean_mix": each
token's output is the mean of the values of its document's tokens up to and including it (a causal,
document-aware cumulative mean — the simplest linear-attention-like mixer). Under sequence
parallelism the parallel layer gives those slots the op registered for "mean_mix" here, so a model
whose layers take two op kinds exercises every seam a hybrid model needs: per-layer slot kinds in
the model, per-kind op builders in parallel/, and the spec in the registry.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

from meshweave.core.comm import CommGroup
from meshweave.core.mesh import Mesh
from meshweave.core.schema import ParallelConfig
from meshweave.models.attention_api import AttentionMeta, AttentionSlot, attention_slots
from meshweave.models.llama.config import LlamaConfig
from meshweave.models.llama.model import Transformer
from meshweave.models.llama.spec import SPEC as LLAMA_SPEC
from meshweave.models.registry import register_model
from meshweave.parallel.sequence import SLOT_OP_BUILDERS


@dataclasses.dataclass
class AlternatingConfig(LlamaConfig):
    kind: Literal["alternating"] = "alternating"


def mean_mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
    """out[b, i] = mean of v[b, j] over j <= i in i's document (full sequence on this rank); kv heads are
    repeated to the query heads as grouped-query attention does."""
    v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    b, s, h, d = v.shape
    same_doc = torch.ones(b, s, s, dtype=torch.bool, device=v.device)
    if meta.document_ids is not None:
        same_doc = meta.document_ids[:, :, None] == meta.document_ids[:, None, :]
    weights = (same_doc & torch.ones(s, s, dtype=torch.bool, device=v.device).tril()).to(v.dtype)
    weights = weights / weights.sum(-1, keepdim=True)
    return torch.einsum("bij,bjhd->bihd", weights, v)


def build(cfg: AlternatingConfig) -> Transformer:
    model = Transformer(cfg)
    for i, slot in enumerate(attention_slots(model)):
        if i % 2:
            slot.kind, slot.op = "mean_mix", mean_mix
    return model


class _GatherSequence(torch.autograd.Function):
    """All-gather along the sequence (dim 1); backward: all-reduce the full gradient, keep this rank's part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: CommGroup) -> torch.Tensor:
        ctx.group = group
        return group.all_gather(x.contiguous(), dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        full = ctx.group.all_reduce(grad.contiguous().clone())
        return full.chunk(ctx.group.size, dim=1)[ctx.group.rank], None


class MeanMixSequenceParallel:
    """mean_mix over the SP group: gather the values in the layout's order, mix, keep this rank's shard."""

    def __init__(self, group: CommGroup, layout_op) -> None:
        self.group, self.layout = group, layout_op

    def _full(self, x: torch.Tensor, differentiable: bool) -> torch.Tensor:
        gathered = _GatherSequence.apply(x, self.group) if differentiable else self.group.all_gather(x.contiguous(), dim=1)
        return self.layout.unshard(list(gathered.chunk(self.group.size, dim=1)), dim=1)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        docs = None if meta.document_ids is None else self._full(meta.document_ids, differentiable=False)
        out = mean_mix(q, k, self._full(v, differentiable=True), AttentionMeta(docs, meta.causal))
        return self.layout.shard(out, dim=1)


def _mean_mix_op(mesh: Mesh, p: ParallelConfig, layout_op) -> MeanMixSequenceParallel:
    return MeanMixSequenceParallel(mesh.group("sp"), layout_op)


SPEC = dataclasses.replace(
    LLAMA_SPEC, kind="alternating", build=build,
    attention_slots=lambda cfg: ["softmax" if i % 2 == 0 else "mean_mix" for i in range(cfg.n_layers)],
)
register_model("alternating", AlternatingConfig, "tests.toy_models:SPEC")
SLOT_OP_BUILDERS["mean_mix"] = _mean_mix_op


def slot_kinds(model) -> list[str]:
    return [slot.kind for slot in attention_slots(model)]


__all__ = ["AlternatingConfig", "AttentionSlot", "MeanMixSequenceParallel", "SPEC", "mean_mix", "slot_kinds"]
