"""Tensor parallelism (Megatron-style, with sequence-parallel norms) as DTensor plans written as data.

The plan maps module paths to `torch.distributed.tensor.parallel` styles:

- `tok_embeddings`: vocab-parallel (RowwiseParallel over the vocabulary rows): each rank looks up
  the ids in its vocabulary slice, and the partial embeddings are reduce-scattered along the
  sequence, so the residual stream between blocks is sharded by sequence (Shard(1)).
- per block: `attention_norm` / `ffn_norm` SequenceParallel (norms run on this rank's tokens);
  `attention` / `feed_forward` inputs all-gathered along the sequence; wq/wk/wv and w1/w3
  column-wise (each rank owns n_heads/tp heads, n_kv_heads/tp kv heads, ffn_hidden/tp units);
  wo and w2 row-wise with a reduce-scatter back to sequence shards.
- `norm` SequenceParallel, `output` column-wise over the vocabulary and left as a DTensor sharded
  on the vocab dimension, so the loss is vocab-parallel (see loss_parallel.py): no rank ever holds
  full-vocabulary logits.

Everything that crosses a block boundary (and hence a pipeline stage boundary) is a plain local
tensor of shape (batch, seq/tp, dim): pipeline P2P carries only this rank's sequence shard.
"""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

# Module path (relative to the Transformer) -> style. The block plan is relative to a block.
TOP_LEVEL_PLAN: dict[str, ParallelStyle] = {
    "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
    "norm": SequenceParallel(),
    "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
}

BLOCK_PLAN: dict[str, ParallelStyle] = {
    "attention_norm": SequenceParallel(),
    # (x, rope, meta): only x is sharded; rope angles and the attention meta are per full sequence.
    "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                    desired_input_layouts=(Replicate(), None, None)),
    "attention.wq": ColwiseParallel(),
    "attention.wk": ColwiseParallel(),
    "attention.wv": ColwiseParallel(),
    "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
    "ffn_norm": SequenceParallel(),
    "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
    "feed_forward.w1": ColwiseParallel(),
    "feed_forward.w3": ColwiseParallel(),
    "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
}


def tensor_parallel_plan(model: nn.Module) -> dict[str, ParallelStyle]:
    """The full plan for this (possibly pipeline-split) model: entries for pieces it does not own are left out."""
    plan = {path: style for path, style in TOP_LEVEL_PLAN.items() if getattr(model, path, None) is not None}
    for name in model.layers:
        plan.update({f"layers.{name}.{path}": style for path, style in BLOCK_PLAN.items()})
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    """Shard `model` in place over `tp_mesh` with `tensor_parallel_plan`.

    Communicates over the tp mesh, per block and per microbatch: forward one all-gather of the
    (batch, seq/tp, dim) activations before attention and before the FFN, one reduce-scatter of
    (batch, seq, dim) partial sums after wo and after w2; backward the mirror images. The embedding
    adds a reduce-scatter (forward) and the head an all-gather (forward), mirrored in backward.
    """
    if tp_mesh.size() == 1:
        return model
    return parallelize_module(model, tp_mesh, tensor_parallel_plan(model))
