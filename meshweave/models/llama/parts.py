"""The torch side of the `llama` spec: TP plan, FSDP units, pipeline stages, loss (imported on first use).

This file, spec.py and model.py are the only places that name the decoder's attributes.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
)

from meshweave.core.batch import IGNORE_INDEX, Batch
from meshweave.models.llama.model import Transformer
from meshweave.models.spec import FsdpUnit

# Tensor parallelism (Megatron-style with sequence-parallel norms), as data. Everything that crosses a
# block boundary is a local (batch, seq/tp, dim) tensor, so pipeline P2P carries only a sequence shard:
# - tok_embeddings vocab-parallel (rows over the vocabulary), output reduce-scattered along the sequence;
# - per block: norms on this rank's tokens; attention / FFN inputs all-gathered along the sequence;
#   wq/wk/wv, w1/w3 column-wise (heads and hidden units split); wo, w2 row-wise, reduce-scattered back;
# - norm on this rank's tokens; output column-wise over the vocabulary and left sharded on it, so the
#   loss is vocab-parallel (no rank holds full-vocabulary logits).
TOP_LEVEL_PLAN: dict[str, ParallelStyle] = {
    "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
    "norm": SequenceParallel(),
    "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
}
BLOCK_PLAN: dict[str, ParallelStyle] = {
    "attention_norm": SequenceParallel(),
    # (x, rope, meta): only x is sharded; rope angles and the attention meta are per full sequence.
    "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)),
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


def tensor_parallel_plan(model: Transformer) -> dict[str, ParallelStyle]:
    """The plan for this (possibly pipeline-split) model: pieces it does not own are left out."""
    plan = {path: style for path, style in TOP_LEVEL_PLAN.items() if getattr(model, path, None) is not None}
    for name in model.layers:
        plan.update({f"layers.{name}.{path}": style for path, style in BLOCK_PLAN.items()})
    return plan


def fsdp_units(model: Transformer) -> list[FsdpUnit]:
    """Embeddings, each block, [final norm + head] (kept gathered: its backward follows at once)."""
    units = [FsdpUnit([model.tok_embeddings])] if model.tok_embeddings is not None else []
    units += [FsdpUnit([block]) for block in model.layers.values()]
    head = [m for m in (model.norm, model.output) if m is not None]
    return units + ([FsdpUnit(head, keep_gathered=True)] if head else [])


def blocks(model: Transformer) -> list[nn.Module]:
    return list(model.layers.values())


def stage_module(model: Transformer, layers: list[int], is_first: bool, is_last: bool) -> Transformer:
    """A copy holding only `layers` (plus the embedding on the first stage and norm + head on the
    last); parameter names are those of the full model, so checkpoints are layout-independent."""
    part = copy.deepcopy(model)
    keep = {str(i) for i in layers}
    for name in [n for n in part.layers if n not in keep]:
        del part.layers[name]
    if not is_first:
        part.tok_embeddings = None
    if not is_last:
        part.norm, part.output = None, None
    return part


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of token cross-entropy in fp32; IGNORE_INDEX targets excluded."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def count_targets(batch: Batch) -> torch.Tensor:
    return (batch.labels != IGNORE_INDEX).sum()
