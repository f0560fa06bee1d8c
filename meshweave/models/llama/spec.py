"""The `llama` model spec: what each parallelism needs from the Llama-style decoder.

Torch-free at import (so `meshweave plan` and `config` answer without loading torch): the pieces that
need torch live in parts.py and model.py and are imported when first called.
"""

from __future__ import annotations

from typing import Any

from meshweave.models.llama.config import LlamaConfig
from meshweave.models.llama.flops import block_params, embedding_params, flops_per_token, parameter_count
from meshweave.models.spec import LayerCosts, ModelSpec, ParallelLayout


def _parts() -> Any:
    from meshweave.models.llama import parts

    return parts


def build(cfg: LlamaConfig) -> Any:
    from meshweave.models.llama.model import Transformer

    return Transformer(cfg)


def layer_costs(cfg: LlamaConfig, seq_len: int) -> LayerCosts:
    """Per-token forward FLOPs: each block (2 per matmul parameter + causal attention), the embedding
    (a lookup, counted as the dim values it moves) and norm + head + loss (2*dim*vocab + ~5*vocab)."""
    block = 2 * (block_params(cfg) - 2 * cfg.dim) + 2 * seq_len * cfg.head_dim * cfg.n_heads
    return LayerCosts([float(block)] * cfg.n_layers, float(cfg.dim), float(2 * cfg.dim * cfg.vocab_size + 5 * cfg.vocab_size))


def stage_parameters(cfg: LlamaConfig, layers: int, is_first: bool, is_last: bool) -> int:
    return layers * block_params(cfg) + is_first * embedding_params(cfg) + is_last * (cfg.dim * cfg.vocab_size + cfg.dim)


def validate(cfg: LlamaConfig, layout: ParallelLayout) -> list[str]:
    """The decoder's own shape rules, then what tensor parallelism needs of it."""
    if min(cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.ffn_hidden, cfg.vocab_size) < 1:
        return ["model: dim, n_layers, n_heads, n_kv_heads, ffn_hidden and vocab_size must all be >= 1"]
    if cfg.dim % cfg.n_heads:
        return [f"model.n_heads: dim {cfg.dim} is not divisible by n_heads {cfg.n_heads}; pick n_heads dividing dim"]
    if cfg.head_dim % 2:
        return [f"model.n_heads: head dim {cfg.head_dim} (dim/n_heads) must be even for RoPE"]
    if cfg.n_heads % cfg.n_kv_heads:
        return [f"model.n_kv_heads: n_heads {cfg.n_heads} is not divisible by n_kv_heads {cfg.n_kv_heads} (grouped-query "
                f"attention needs whole groups)"]
    return _tensor_parallel_problems(cfg, layout.tp)


def _tensor_parallel_problems(cfg: LlamaConfig, tp: int) -> list[str]:
    if tp == 1:
        return []
    if cfg.n_heads % tp:
        return [f"parallel.tp: model.n_heads {cfg.n_heads} is not divisible by tp {tp}; choose tp dividing n_heads"]
    if cfg.n_kv_heads % tp:
        return [f"parallel.tp: model.n_kv_heads {cfg.n_kv_heads} is not divisible by tp {tp}; use n_kv_heads a multiple "
                f"of tp (kv-head replication is not supported)"]
    if cfg.ffn_hidden % tp:
        return [f"parallel.tp: model.ffn_hidden {cfg.ffn_hidden} is not divisible by tp {tp}"]
    if cfg.vocab_size % tp:
        return [f"parallel.tp: model.vocab_size {cfg.vocab_size} is not divisible by tp {tp} (vocab-parallel "
                f"embedding and loss); pad vocab_size to a multiple of {tp}"]
    return []


SPEC = ModelSpec(
    kind="llama",
    build=build,
    input_field="tokens",
    kwarg_fields=("position_ids", "document_ids"),
    target_field="labels",
    loss_sum=lambda *a: _parts().cross_entropy_sum(*a),
    count_targets=lambda *a: _parts().count_targets(*a),
    tp_plan=lambda *a: _parts().tensor_parallel_plan(*a),
    loss_parallel=True,
    fsdp_units=lambda *a: _parts().fsdp_units(*a),
    blocks=lambda *a: _parts().blocks(*a),
    num_layers=lambda cfg: cfg.n_layers,
    pipeline_stage=lambda *a: _parts().stage_module(*a),
    layer_costs=layer_costs,
    flops_per_token=flops_per_token,
    parameter_count=parameter_count,
    stage_parameters=stage_parameters,
    hidden_width=lambda cfg: cfg.dim,
    output_width=lambda cfg: cfg.vocab_size,
    attention_slots=lambda cfg: ["softmax"] * cfg.n_layers,
    slot_kinds=lambda cfg: frozenset({"softmax"}),
    attention_heads=lambda cfg: (cfg.n_heads, cfg.n_kv_heads),
    validate=validate,
)
