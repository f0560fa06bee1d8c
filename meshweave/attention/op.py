"""`SequenceParallelAttention`: every SP method behind the model's `AttentionOp` seam.

The op receives this rank's shard of q (B, S_local, H, D) and k, v (B, S_local, H_kv, D) in the
method's layout (see layout.py) and returns this rank's shard of the output; document ids in
`AttentionMeta` are sharded with the same layout. What each method communicates is documented in
its module ("allgather", the all-gather-K/V scheme of LASP-2H and llama3's context parallelism, in lasp2h.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from meshweave.attention.lasp2h import allgather_kv_attention
from meshweave.attention.layout import METHODS, shard_segments, shard_sequence, unshard_sequence
from meshweave.attention.local import default_scale
from meshweave.attention.ring import ring_attention
from meshweave.attention.tokenring import tokenring_attention
from meshweave.attention.ulysses import ulysses_attention
from meshweave.attention.usp import usp_attention
from meshweave.attention.validate import validate_sp
from meshweave.core.comm import CommGroup, single_process_group
from meshweave.models.attention_api import AttentionMeta

# The methods that take heads-first q, k, v and every rank's segments (ring's signature); local is a one-rank ring.
_SEGMENT_OPS = {"local": ring_attention, "ring": ring_attention, "tokenring": tokenring_attention,
                "allgather": allgather_kv_attention}


class SequenceParallelAttention:
    """An `AttentionOp` for one method over its SP group(s)."""

    def __init__(
        self,
        method: str,
        group: CommGroup | None = None,
        *,
        ulysses_group: CommGroup | None = None,
        ring_group: CommGroup | None = None,
        scale: float | None = None,
        backend: str = "auto",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown sequence-parallel method {method!r}; choose one of {METHODS}")
        if method == "usp":
            if ulysses_group is None or ring_group is None:
                raise ValueError("usp needs both ulysses_group and ring_group")
        elif group is None:
            group = single_process_group("sp")
        if method == "local" and group.size != 1:
            raise ValueError(f"method local runs on one rank; got a group of size {group.size}")
        self.method, self.group, self.scale, self.backend = method, group, scale, backend
        self.ulysses_group, self.ring_group = ulysses_group, ring_group

    @property
    def sp_size(self) -> int:
        if self.method == "usp":
            return self.ulysses_group.size * self.ring_group.size
        return self.group.size

    @property
    def sp_rank(self) -> int:
        if self.method == "usp":
            return self.ring_group.rank * self.ulysses_group.size + self.ulysses_group.rank
        return self.group.rank

    @property
    def ulysses_degree(self) -> int | None:
        return self.ulysses_group.size if self.method == "usp" else None

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of a full-sequence tensor in this method's layout."""
        return shard_sequence(x, self.method, self.sp_rank, self.sp_size, dim, self.ulysses_degree)

    def unshard(self, shards: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
        """The full-sequence tensor from every SP rank's shard, listed by SP rank."""
        return unshard_sequence(shards, self.method, dim, self.ulysses_degree)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        errors = validate_sp(self.method, q.shape[2], k.shape[2], self.sp_size, q.shape[1] * self.sp_size, self.ulysses_degree)
        if errors:
            raise ValueError("; ".join(errors))
        scale = self.scale if self.scale is not None else default_scale(q.shape[-1])
        docs, causal, cache = meta.document_ids, meta.causal, meta.cache
        if self.method == "ulysses":
            return ulysses_attention(q, k, v, self.group, causal, scale, docs, self.backend, cache)
        if self.method == "usp":
            return usp_attention(q, k, v, self.ulysses_group, self.ring_group, causal, scale, docs, self.backend, cache)
        p, seq_len = self.group.size, q.shape[1] * self.group.size
        segments = [shard_segments(self.method, seq_len, p, r) for r in range(p)]
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        fn = _SEGMENT_OPS[self.method]
        return fn(qt, kt, vt, self.group, segments, causal, scale, docs, self.backend, cache).transpose(1, 2)


def build_attention_op(method: str, group: CommGroup | None = None, **options: Any) -> SequenceParallelAttention:
    """The `AttentionOp` for `method` ("local", "ulysses", "ring", "tokenring", "usp", "allgather").

    local/ulysses/ring/tokenring/allgather take the SP `group`; usp takes `ulysses_group` (inner) and
    `ring_group` (outer) as returned, by rank list, from `usp_rank_groups`. Install it with
    `models.attention_api.install_ops(model, {"softmax": op})` and shard inputs with `op.shard(x)`. `options`: ulysses_group,
    ring_group, scale, backend, as for `SequenceParallelAttention`.
    """
    return SequenceParallelAttention(method, group, **options)
