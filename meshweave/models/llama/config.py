"""`LlamaConfig`: the `model:` section for `kind: llama` (torch-free, so config loading stays fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meshweave.core.schema import AtLeast1, Positive


@dataclass
class LlamaConfig:
    kind: Literal["llama"] = "llama"
    vocab_size: AtLeast1 = 320  # tokens; the byte tokenizer needs >= 259, 320 divides by common tp degrees
    dim: AtLeast1 = 256  # residual width
    n_layers: AtLeast1 = 4
    n_heads: AtLeast1 = 8
    n_kv_heads: AtLeast1 = 4  # grouped-query attention: n_heads must be a multiple
    ffn_hidden: AtLeast1 = 688  # SwiGLU hidden units
    rope_theta: Positive = 10000.0  # RoPE base
    norm_eps: Positive = 1e-5  # RMSNorm epsilon
    init_std: Positive = 0.02  # std of the normal weight init

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads
