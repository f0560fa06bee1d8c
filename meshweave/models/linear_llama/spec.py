"""The `linear_llama` and `hybrid` model specs: Llama's spec with linear layers (torch-free at import).

What differs from Llama: the module (linear layers), the per-layer slot kinds ("linear", and "softmax" on every
k-th layer of a hybrid), the TP plan (plus each linear layer's decay slice), FLOPs and layer costs, and the checks.
Under sequence parallelism "linear" slots get LASP-2 and "softmax" slots the configured method, both in that
method's batch layout (parallel/sequence.py); sp_method allgather on a hybrid's softmax slots makes it LASP-2H.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meshweave.models.linear_llama.config import LinearLlamaConfig, layer_kinds, slot_kinds
from meshweave.models.linear_llama.flops import flops_per_token, mixing_flops
from meshweave.models.llama.flops import block_params
from meshweave.models.llama.spec import SPEC as LLAMA_SPEC
from meshweave.models.llama.spec import validate as validate_llama
from meshweave.models.spec import LayerCosts, ParallelLayout


def build(cfg: LinearLlamaConfig) -> Any:
    from meshweave.models.linear_llama.model import build as build_model

    return build_model(cfg)


def tp_plan(model: Any) -> Any:
    from meshweave.models.linear_llama.parts import tensor_parallel_plan

    return tensor_parallel_plan(model)


def layer_costs(cfg: LinearLlamaConfig, seq_len: int) -> LayerCosts:
    """Per-token forward FLOPs of each layer (its matmuls plus its own token mixing), embedding and head as Llama's."""
    matmuls = 2 * (block_params(cfg) - 2 * cfg.dim)
    llama = LLAMA_SPEC.layer_costs(cfg, seq_len)
    return LayerCosts([float(matmuls + mixing_flops(cfg, kind, seq_len)) for kind in layer_kinds(cfg)],
                      llama.first_extra, llama.last_extra)


def validate(cfg: LinearLlamaConfig, layout: ParallelLayout) -> list[str]:
    """Llama's shape and tensor-parallel rules, then the hybrid's layer pattern.

    Every feature map works with every decay here (no denominator; each head's output is RMS-normalised), and
    LASP-2 runs in any layout the softmax method accepts (checked with the parallel section), so there is no
    further layout rule for the linear layers.
    """
    problems = validate_llama(cfg, layout)
    if problems or cfg.kind != "hybrid":
        return problems
    every = cfg.softmax_every
    if every < 1:
        return [f"model.softmax_every: {every} must be >= 1 (every k-th layer keeps softmax attention; 1 = all)"]
    if every > cfg.n_layers:
        return [f"model.softmax_every: {every} > n_layers {cfg.n_layers} leaves no softmax layer; lower it, or use "
                f"kind: linear_llama for an all-linear model"]
    return []


LINEAR_LLAMA_SPEC = dataclasses.replace(
    LLAMA_SPEC,
    kind="linear_llama",
    build=build,
    tp_plan=tp_plan,
    layer_costs=layer_costs,
    flops_per_token=flops_per_token,
    attention_slots=layer_kinds,
    slot_kinds=slot_kinds,
    validate=validate,
)
HYBRID_SPEC = dataclasses.replace(LINEAR_LLAMA_SPEC, kind="hybrid")
