"""The seam between a model and whatever computes attention (local SDPA or a sequence-parallel op).

A model computes q, k, v for the tokens it holds and calls an `AttentionOp`. Under sequence
parallelism those tokens are this rank's shard, in the layout the SP method chose; the op
communicates as it needs and returns this rank's shard of the output. Models never import
attention/ or parallel/: the op is injected (see `Transformer.set_attention_op`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class AttentionMeta:
    """Per-forward facts an attention op needs besides q, k, v.

    document_ids: (B, S_local) integer id of the document each local token belongs to, in the
        same layout as q/k/v, or None when every sequence is one document. Tokens attend only to
        tokens of their own document.
    causal: whether a token sees only earlier tokens (by position in the full sequence).
    """

    document_ids: torch.Tensor | None = None
    causal: bool = True


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
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(meta.document_ids, meta.causal))
    return out.transpose(1, 2)


def document_mask(document_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, 1, S, S) boolean mask: True where query i may attend key j."""
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    if causal:
        s = document_ids.shape[1]
        same_doc = same_doc & torch.ones(s, s, dtype=torch.bool, device=document_ids.device).tril()
    return same_doc[:, None]
