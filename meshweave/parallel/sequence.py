"""Sequence parallelism in the composition: give each attention slot the SP op for its kind, and
shard each batch to match.

The ops (attention/) communicate inside token mixing only; everything else in a layer is per-token,
so the rest of the model just runs on this rank's tokens. Every batch field with a declared
sequence dimension (tokens, labels, position ids, document ids, ...) is sharded with the method's
layout (zigzag for ring-based methods and allgather), so positions, document masks and the loss stay exact.

Op kinds: "softmax" slots take the configured method (ulysses, ring, tokenring, usp, allgather), "linear" slots
LASP-2 (a hybrid with allgather on its softmax slots runs LASP-2H). sp_method dsp instead installs DSP in the
model's layout slots (models/layout_api.py) and leaves attention local; on such a (factorised) model ulysses is
Ulysses as a generic runtime applies it (the flattened tokens sharded, all-to-alls in every attention:
attention/flattened_ulysses.py) and ring the embedded baseline (frames sharded throughout, ring attention in the
temporal blocks: attention/embedded_sp.py). A new kind adds a builder to
`SLOT_OP_BUILDERS`; all kinds share the batch layout of the softmax method, which every builder receives.
(launch/plan.py names each kind's op without importing torch: keep its names in step with these builders.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from meshweave.attention import SequenceParallelAttention, usp_rank_groups
from meshweave.attention.dsp import DynamicSequenceParallel
from meshweave.attention.embedded_sp import EmbeddedLayout, factorised_ring, factorised_ulysses
from meshweave.attention.flattened_ulysses import FlattenedUlysses
from meshweave.attention.lasp2 import lasp2_for_layout
from meshweave.core.batch import Batch
from meshweave.core.mesh import Mesh
from meshweave.core.schema import ParallelConfig
from meshweave.models.attention_api import AttentionOp, attention_slots, install_ops
from meshweave.models.layout_api import layout_slots
from meshweave.parallel.runner import BatchSharder

# op kind -> builder(mesh, parallel config, the softmax op that fixes the layout) -> AttentionOp
SlotOpBuilder = Callable[[Mesh, ParallelConfig, SequenceParallelAttention], AttentionOp]
SLOT_OP_BUILDERS: dict[str, SlotOpBuilder] = {
    "softmax": lambda mesh, p, layout_op: layout_op,
    "linear": lambda mesh, p, layout_op: lasp2_for_layout(mesh.group("sp"), layout_op),  # LASP-2 in the same layout
}


def build_sp_op(mesh: Mesh, p: ParallelConfig) -> SequenceParallelAttention:
    """The softmax op over this rank's SP group; USP creates its Ulysses x Ring sub-groups here."""
    if p.sp_method != "usp":
        return SequenceParallelAttention(p.sp_method, mesh.group("sp"))
    pairs = [usp_rank_groups(ranks, p.usp.ulysses) for ranks in mesh.dims.groups(("sp",))]
    ulysses = mesh.make_group("sp_ulysses", [g for u, _ in pairs for g in u])
    ring = mesh.make_group("sp_ring", [g for _, r in pairs for g in r])
    return SequenceParallelAttention("usp", ulysses_group=ulysses, ring_group=ring)


def apply_dynamic_sequence_parallel(model: nn.Module, mesh: Mesh) -> BatchSharder:
    """DSP: the model's layout slots shard and reshard its activations; attention slots stay local (DSP never
    communicates inside attention). The batch is not sharded: the model takes its own part at entry."""
    slots = layout_slots(model)
    if not slots:
        raise ValueError("sp_method dsp needs a model with a LayoutSlot (factorised spatial/temporal attention, "
                         "e.g. kind st_dit); use another sp_method for this model")
    op = DynamicSequenceParallel(mesh.group("sp"))
    for slot in slots:
        slot.op = op
    return lambda batch: batch


def apply_embedded_sequence_parallel(model: nn.Module, mesh: Mesh, method: str) -> BatchSharder:
    """The embedded baselines for factorised models: activations sharded on the frames throughout, Ulysses or ring
    inside the attention of blocks attending over them (attention/embedded_sp.py; sp_method ring runs the ring
    one, the Ulysses one is the stronger Ulysses baseline that benchmarks/bench_dsp.py installs). The batch is not
    sharded (the model shards at entry)."""
    group = mesh.group("sp")
    for slot in layout_slots(model):
        slot.op = EmbeddedLayout(group, dim=1)
    op = factorised_ulysses(group) if method == "ulysses" else factorised_ring(group)
    install_ops(model, {slot.kind: op for slot in attention_slots(model)})
    return lambda batch: batch


def apply_flattened_ulysses(model: nn.Module, mesh: Mesh) -> BatchSharder:
    """sp_method ulysses on a factorised model: the layout slots shard the flattened tokens, and every attention
    slot all-to-alls q, k, v to head shards and back (attention/flattened_ulysses.py). The batch is not sharded
    (the model shards at entry)."""
    ulysses = FlattenedUlysses(mesh.group("sp"))
    for slot in layout_slots(model):
        slot.op = ulysses
    install_ops(model, {slot.kind: ulysses.attention(slot.kind) for slot in attention_slots(model)})
    return lambda batch: batch


def apply_sequence_parallel(model: nn.Module, mesh: Mesh, p: ParallelConfig) -> BatchSharder:
    """Install the SP op of each slot kind in `model`; return the function that shards a batch for them."""
    if p.sp_method == "dsp":
        return apply_dynamic_sequence_parallel(model, mesh)
    if p.sp_method == "ulysses" and layout_slots(model):
        return apply_flattened_ulysses(model, mesh)
    if p.sp_method == "ring" and layout_slots(model):
        return apply_embedded_sequence_parallel(model, mesh, p.sp_method)
    layout_op = build_sp_op(mesh, p)
    kinds = {slot.kind for slot in attention_slots(model)}
    unknown = kinds - set(SLOT_OP_BUILDERS)
    if unknown:
        raise ValueError(f"no sequence-parallel op for attention slot kind(s) {sorted(unknown)}; "
                         f"known: {', '.join(sorted(SLOT_OP_BUILDERS))}")
    install_ops(model, {kind: SLOT_OP_BUILDERS[kind](mesh, p, layout_op) for kind in kinds})

    def shard(batch: Batch) -> Batch:
        return batch.map_sequence(lambda t, dim: layout_op.shard(t, dim=dim))

    return shard
