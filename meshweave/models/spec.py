"""`ModelSpec`: everything the rest of meshweave needs to know about a model kind, in one place.

As torchtitan's ModelSpec/TrainSpec do, a kind bundles its module with what each parallelism needs
from it; parallel/, train/ and launch/ read the spec and never name a model's attributes:

- batch: which named fields the model consumes (`input_field` positionally, then `kwarg_fields`
  when present in the batch), which field the loss reads, how targets are counted (the loss is a
  sum over targets, divided by the global count: the normalisation every layout shares);
- tensor parallelism: the DTensor plan as data (module path -> ParallelStyle);
- data parallelism: the FSDP2 units; activation checkpointing: the blocks;
- pipeline parallelism: the number of layers, a stage module holding some of them, and the cost of
  each layer (plus the first stage's and the last stage's extra work) for the cost-balanced split;
- accounting: FLOPs per token, parameters, and the widths the memory estimate needs;
- token mixing: the op kind of each layer's attention slot; and the model's own layout checks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from meshweave.core.batch import Batch


@dataclass(frozen=True)
class FsdpUnit:
    """Modules sharded together by FSDP2; `keep_gathered` for units whose backward follows their forward
    at once (the head), which would otherwise be all-gathered twice in a row."""

    modules: list[nn.Module]
    keep_gathered: bool = False


@dataclass(frozen=True)
class LayerCosts:
    """Per-token forward cost of each layer, and the extra work of the first and last pipeline stage."""

    layers: list[float]
    first_extra: float
    last_extra: float


@dataclass(frozen=True)
class ParallelLayout:
    """What a model's own layout checks need to know of the parallel config."""

    tp: int
    sp: int
    sp_method: str
    seq_len: int
    pp: int = 1


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    build: Callable[[Any], nn.Module]  # config -> full model, on the current default device
    input_field: str  # positional input of the model (and of the first pipeline stage)
    kwarg_fields: tuple[str, ...]  # further inputs, passed by name to every stage when the batch has them
    target_field: str
    loss_sum: Callable[[Any, torch.Tensor], torch.Tensor]  # (model output, targets) -> summed loss
    count_targets: Callable[[Batch], torch.Tensor]  # targets in a batch (device tensor, no host sync)
    tp_plan: Callable[[nn.Module], dict[str, Any]]  # module path -> ParallelStyle, for what this part holds
    loss_parallel: bool  # under tp the output stays sharded and the loss runs in torch's loss_parallel()
    fsdp_units: Callable[[nn.Module], list[FsdpUnit]]
    blocks: Callable[[nn.Module], list[nn.Module]]  # activation-checkpointing units
    num_layers: Callable[[Any], int]
    pipeline_stage: Callable[[nn.Module, list[int], bool, bool], nn.Module]  # (model, layers, first, last)
    layer_costs: Callable[[Any, int], LayerCosts]  # (config, seq_len)
    flops_per_token: Callable[[Any, int], float]  # training FLOPs (fwd + bwd) per token at seq_len
    parameter_count: Callable[[Any], int]
    stage_parameters: Callable[[Any, int, bool, bool], int]  # (config, layers held, first, last)
    hidden_width: Callable[[Any], int]  # values per token between layers (activations, P2P)
    output_width: Callable[[Any], int]  # values per token of the output (logits) on the last stage
    attention_slots: Callable[[Any], list[str]]  # op kind of each layer's slot, in layer order
    attention_heads: Callable[[Any], tuple[int, int]]  # (query heads, kv heads) for SP/TP checks
    validate: Callable[[Any, ParallelLayout], list[str]]  # one-line problems of this model under a layout
    # The set of kinds among attention_slots, without listing layers (plan and validation must not grow with
    # n_layers); None = taken from attention_slots.
    slot_kinds: Callable[[Any], frozenset[str]] | None = None
    # Models with factorised multi-dimensional attention (spatial x temporal, ...): the activation dim each block
    # attends over, in block order (dims of the (B, T, S, C) activations; see models/layout_api.py). DSP
    # (sp_method dsp) needs it; None = a one-dimensional sequence model.
    factorised_dims: Callable[[Any], list[int]] | None = None
    # The model's own data set (config -> object with __len__ and batch(rows) -> Batch); None = packed text.
    build_dataset: Callable[[Any], Any] | None = None
    # Tokens per sample (what flops_per_token counts per) when not train.seq_len, e.g. a video's frames x patches.
    tokens_per_sample: Callable[[Any], int] | None = None


def slot_kinds(spec: ModelSpec, cfg: Any) -> frozenset[str]:
    """The op kinds of the model's attention slots ("softmax", "linear", ...)."""
    return spec.slot_kinds(cfg) if spec.slot_kinds is not None else frozenset(spec.attention_slots(cfg))
