"""Sequence-parallel attention: local, Ulysses, Ring (zigzag), TokenRing, USP and all-gather K/V behind one op.

Public API:
    build_attention_op(method, group=None, *, ulysses_group=None, ring_group=None, scale=None, backend="auto")
    shard_sequence(x, method, rank, size, dim=1, ulysses_degree=None) / unshard_sequence(shards, method, dim=1, ...)
    validate_sp(method, n_heads, n_kv_heads, sp, seq_len, usp_ulysses=None, split_heads=True) -> list[str]
    usp_rank_groups(sp_ranks, ulysses_degree) -> (ulysses groups, ring groups)
    METHODS

Installing a method (every rank of the SP group runs this, groups created in the same order):

    op = build_attention_op("ring", sp_group)                   # or "ulysses", "tokenring", "allgather"
    # usp: uly_lists, ring_lists = usp_rank_groups(sp_global_ranks, ulysses_degree); new_group each
    #      list in that order; op = build_attention_op("usp", ulysses_group=uly, ring_group=ring)
    install_ops(model, {"softmax": op})                          # models.attention_api
    tokens, positions, labels, doc_ids = (op.shard(t) for t in (tokens, positions, labels, doc_ids))
    loss = cross_entropy(model(tokens, positions, doc_ids), labels, reduction="sum")
    # then sum gradients over the SP group (dp x sp for data parallelism) as usual.

Errors for an impossible layout come from `validate_sp` (also raised as ValueError by the op).
"""

import importlib
from typing import Any

# name -> submodule. Resolved on first access (PEP 562) so that `meshweave.attention.validate`, which
# config validation uses, can be imported without loading torch.
_EXPORTS = {
    "METHODS": "layout", "shard_indices": "layout", "shard_segments": "layout", "shard_sequence": "layout",
    "unshard_sequence": "layout", "block_backward": "local", "block_forward": "local", "merge_partials": "merge",
    "SequenceParallelAttention": "op", "build_attention_op": "op", "usp_rank_groups": "usp", "validate_sp": "validate",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'meshweave.attention' has no attribute {name!r}")
    return getattr(importlib.import_module(f"meshweave.attention.{_EXPORTS[name]}"), name)


__all__ = [
    "METHODS",
    "SequenceParallelAttention",
    "block_backward",
    "block_forward",
    "build_attention_op",
    "merge_partials",
    "shard_indices",
    "shard_segments",
    "shard_sequence",
    "unshard_sequence",
    "usp_rank_groups",
    "validate_sp",
]
