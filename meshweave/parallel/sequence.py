"""Sequence parallelism in the composition: install an SP attention op and shard each batch to match.

The op (attention/) communicates inside attention only; everything else in a block is per-token,
so the rest of the model just runs on this rank's tokens. Tokens, labels, position ids and
document ids are all sharded with the method's layout (zigzag for ring-based methods), so RoPE
positions, document masks and the token loss stay exact.
"""

from __future__ import annotations

import torch.nn as nn

from meshweave.attention import SequenceParallelAttention, usp_rank_groups
from meshweave.parallel.runner import BatchSharder
from meshweave.runtime.data import Batch
from meshweave.runtime.mesh import Mesh
from meshweave.runtime.schema import ParallelConfig


def build_sp_op(mesh: Mesh, p: ParallelConfig) -> SequenceParallelAttention:
    """The attention op over this rank's SP group; USP creates its Ulysses x Ring sub-groups here."""
    if p.sp_method != "usp":
        return SequenceParallelAttention(p.sp_method, mesh.group("sp"))
    pairs = [usp_rank_groups(ranks, p.usp.ulysses) for ranks in mesh.dims.groups(("sp",))]
    ulysses = mesh.make_group("sp_ulysses", [g for u, _ in pairs for g in u])
    ring = mesh.make_group("sp_ring", [g for _, r in pairs for g in r])
    return SequenceParallelAttention("usp", ulysses_group=ulysses, ring_group=ring)


def apply_sequence_parallel(model: nn.Module, mesh: Mesh, p: ParallelConfig) -> BatchSharder:
    """Install the SP op in every attention layer; return the function that shards a batch for it."""
    op = build_sp_op(mesh, p)
    model.set_attention_op(op)

    def shard(batch: Batch) -> Batch:
        return Batch(*(op.shard(t, dim=1) for t in (batch.tokens, batch.labels, batch.position_ids, batch.document_ids)))

    return shard
