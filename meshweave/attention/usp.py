"""USP (unified sequence parallelism): Ulysses inside a group, ring attention across groups.

SP degree P = P_u x P_r. Ulysses groups are blocks of P_u consecutive SP ranks (fast links), ring
groups take every P_u-th SP rank; SP rank = ring_rank * P_u + ulysses_rank. The usp layout (see
layout.py) gives each Ulysses group one zigzag pair, so after the Ulysses all-to-all the ring sees
a balanced zigzag layout.

Communication per call: the Ulysses all-to-alls over the ulysses group (4 forward, 4 backward, on
tensors of S_local tokens), and the ring traffic over the ring group on blocks of S_local * P_u
tokens and H_kv' / P_u kv heads (H_kv' = kv heads after replication to a multiple of P_u); document
ids: one all_gather on each group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshweave.attention.layout import zigzag_segments
from meshweave.attention.masks import Segment
from meshweave.attention.ring import cached, ring_attention
from meshweave.attention.ulysses_comm import (
    gather_sequence_ids,
    head_to_seq,
    replicate_kv_heads,
    seq_to_head,
)
from meshweave.core.comm import CommGroup
from meshweave.models.attention_api import BatchCache


def usp_rank_groups(sp_ranks: Sequence[int], ulysses_degree: int) -> tuple[list[list[int]], list[list[int]]]:
    """(ulysses groups, ring groups) as lists of global ranks, for one SP group.

    Create them with `new_group` in this order on every rank (first all ulysses groups, then all
    ring groups); the rank's own pair is the ulysses group and ring group that contain it.
    """
    ranks = list(sp_ranks)
    if ulysses_degree < 1 or len(ranks) % ulysses_degree:
        raise ValueError(f"usp needs the ulysses degree ({ulysses_degree}) to divide the SP size ({len(ranks)})")
    u = ulysses_degree
    ulysses = [ranks[i : i + u] for i in range(0, len(ranks), u)]
    ring = [ranks[j::u] for j in range(u)]
    return ulysses, ring


def usp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ulysses_group: CommGroup,
    ring_group: CommGroup,
    causal: bool,
    scale: float,
    document_ids: torch.Tensor | None = None,
    backend: str = "auto",
    cache: BatchCache | None = None,
) -> torch.Tensor:
    """q (B,S_local,H,D), k/v (B,S_local,H_kv,D) in the usp layout -> out (B,S_local,H,D).

    cache: the batch's attention cache (document ids are exchanged and plans made once per batch)."""
    k, v = replicate_kv_heads(k, v, ulysses_group.size)
    qh, kh, vh = (seq_to_head(t, ulysses_group).transpose(1, 2) for t in (q, k, v))
    docs = cached(cache, ("usp_docs", ulysses_group.name, tuple(ulysses_group.ranks)),
                  lambda: gather_sequence_ids(document_ids, ulysses_group))
    ring_len = qh.shape[2] * ring_group.size
    # One rank holds the whole sequence in order: one segment, so each packed document is one kernel call
    # (two zigzag halves would split a document into two calls over the same rows, which must be merged).
    segments = ([[Segment(0, ring_len)]] if ring_group.size == 1
                else [zigzag_segments(ring_len, ring_group.size, i) for i in range(ring_group.size)])
    out = ring_attention(qh, kh, vh, ring_group, segments, causal, scale, docs, backend, cache)
    return head_to_seq(out.transpose(1, 2), ulysses_group)
