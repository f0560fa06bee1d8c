"""The seam between a model and whatever computes its token mixing (local SDPA or a sequence-parallel op).

A model computes q, k, v for the tokens it holds and calls the op held by an `AttentionSlot`. Each
slot declares the *kind* of op it takes ("softmax", "linear", "spatial", ...), so a hybrid model can
mix kinds layer by layer; the parallel layer replaces each slot's op by kind (see
parallel/sequence.py). Under sequence parallelism the tokens are this rank's shard, in the layout
the SP method chose; the op communicates as it needs and returns this rank's shard of the output.
Models never import attention/ or parallel/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F


class BatchCache:
    """Work computed once per (micro)batch and reused by every layer, keyed by the op that made it.

    Not a dict on purpose: FSDP2 and activation checkpointing rebuild their arguments' containers
    (dicts, lists, dataclasses) layer by layer, which would hand each layer an empty copy; an object
    of its own type travels through them by reference.
    """

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[Any, Any] = {}

    def __contains__(self, key: Any) -> bool:
        return key in self._entries

    def __getitem__(self, key: Any) -> Any:
        return self._entries[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._entries[key] = value

    def get(self, key: Any, default: Any = None) -> Any:
        return self._entries.get(key, default)


@dataclass
class AttentionMeta:
    """Per-forward facts an attention op needs besides q, k, v.

    document_ids: (B, S_local) integer id of the document each local token belongs to, in the
        same layout as q/k/v, or None when every sequence is one document. Tokens attend only to
        tokens of their own document.
    causal: whether a token sees only earlier tokens (by position in the full sequence).
    cache: per-batch work an op computes once and every layer reuses (gathered document ids, mask
        plans); a new meta is made for each forward of a (micro)batch, so the cache never outlives it.
    seq_len: the whole length of the attended sequence, for models whose layout may hand a slot a padded part
        of it (factorised attention under embedded SP, attention/embedded_sp.py); None = not given.
    """

    document_ids: torch.Tensor | None = None
    causal: bool = True
    cache: BatchCache = field(default_factory=BatchCache, repr=False, compare=False)
    seq_len: int | None = None  # whole length of the attended sequence, where q/k/v may hold a part of it


class AttentionOp(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        """q: (B, S, H, D); k, v: (B, S, H_kv, D) with H % H_kv == 0. Returns (B, S, H, D)."""
        ...


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
    """Single-process attention over the full sequence via SDPA, with document masking."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # -> (B, H, S, D)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if meta.document_ids is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=meta.causal)
    else:
        mask = meta.cache.get("local_document_mask")
        if mask is None:  # built once per batch, reused by every layer
            mask = meta.cache["local_document_mask"] = document_mask(meta.document_ids, meta.causal)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2)


def document_mask(document_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 1, S, S) boolean mask: True where query i may attend key j."""
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    if causal:
        s = document_ids.shape[1]
        same_doc = same_doc & torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    return same_doc[:, None]


class AttentionSlot(nn.Module):
    """The place in a layer where its token mixer runs: `kind` names the op kind the layer takes.

    Holds no parameters. `op` starts as the single-process op and is replaced by the parallel layer
    with the op for this kind (e.g. the configured sequence-parallel softmax method).
    """

    def __init__(self, kind: str, op: AttentionOp = local_attention) -> None:
        super().__init__()
        self.kind, self.op = kind, op

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        return self.op(q, k, v, meta)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


def attention_slots(model: nn.Module) -> list[AttentionSlot]:
    """Every attention slot of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, AttentionSlot)]


def install_ops(model: nn.Module, ops: Mapping[str, AttentionOp]) -> None:
    """Give every attention slot of `model` the op for its kind (every kind present must have one)."""
    for slot in attention_slots(model):
        if slot.kind not in ops:
            raise ValueError(f"no op for attention slot kind {slot.kind!r}; ops given for: {', '.join(sorted(ops))}")
        slot.op = ops[slot.kind]
