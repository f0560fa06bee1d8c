"""FLOPs of the linear kinds, from the config alone (torch-free). Parameters are Llama's (same projections)."""

from __future__ import annotations

from meshweave.models.linear_llama.config import LinearLlamaConfig, layer_kinds
from meshweave.models.llama.flops import matmul_params

KERNEL_CHUNK = 64  # the linear kernel's block size (models.linear_attention.DEFAULT_CHUNK; a test keeps them equal)


def mixing_flops(cfg: LinearLlamaConfig, kind: str, seq_len: int) -> float:
    """Forward FLOPs per token of one layer's token mixing.

    linear: per head, scores and weighted sum over the causal half of a chunk (2 * chunk * d) plus reading and
    writing the carried state (4 * d * d); softmax: Llama's causal attention (2 * seq_len * d per head).
    """
    d, h = cfg.head_dim, cfg.n_heads
    if kind == "softmax":
        return 2.0 * seq_len * d * h
    return float(h * (2 * min(KERNEL_CHUNK, seq_len) * d + 4 * d * d))


def flops_per_token(cfg: LinearLlamaConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward = 3x forward) per token."""
    mixing = sum(mixing_flops(cfg, kind, seq_len) for kind in layer_kinds(cfg))
    return 3 * (2 * matmul_params(cfg) + mixing)
