"""`LlamaConfig`: the `model:` section for `kind: llama` (torch-free, so config loading stays fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class LlamaConfig:
    kind: Literal["llama"] = "llama"
    vocab_size: int = 320  # tokens; the byte tokenizer needs >= 259, 320 divides by common tp degrees
    dim: int = 256  # residual width
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4  # grouped-query attention: n_heads must be a multiple
    ffn_hidden: int = 688  # SwiGLU hidden units
    rope_theta: float = 10000.0  # RoPE base
    norm_eps: float = 1e-5
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads
