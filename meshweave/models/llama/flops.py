"""Parameter count and training FLOPs per token, computed from the config alone (no model built)."""

from __future__ import annotations

from meshweave.models.llama.config import LlamaConfig


def parameter_count(cfg: LlamaConfig) -> int:
    """All trainable parameters, embeddings and the untied output head included."""
    return embedding_params(cfg) + cfg.n_layers * block_params(cfg) + cfg.dim + cfg.dim * cfg.vocab_size


def embedding_params(cfg: LlamaConfig) -> int:
    return cfg.vocab_size * cfg.dim


def block_params(cfg: LlamaConfig) -> int:
    attn = cfg.dim * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)  # wq, wo + wk, wv
    ffn = 3 * cfg.dim * cfg.ffn_hidden
    return attn + ffn + 2 * cfg.dim  # two RMSNorm weights


def matmul_params(cfg: LlamaConfig) -> int:
    """Parameters that take part in a matmul per token (embedding lookup and norms do not)."""
    return cfg.n_layers * (block_params(cfg) - 2 * cfg.dim) + cfg.dim * cfg.vocab_size


def flops_per_token(cfg: LlamaConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs (forward + backward = 3x forward) per token.

    Forward: 2 FLOPs per matmul parameter, plus attention scores and weighted sum:
    2 * 2 * seq_len * head_dim * n_heads per layer over the full (non-causal) square.
    Causal attention does half of that square's work; we count it as such, as MFU papers do.
    """
    attn_forward = 4 * seq_len * cfg.head_dim * cfg.n_heads * cfg.n_layers
    if causal:
        attn_forward /= 2
    return 3 * (2 * matmul_params(cfg) + attn_forward)
