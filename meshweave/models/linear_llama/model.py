"""The linear-attention decoder: the Llama decoder (models/llama/model.py) whose linear layers' attention is
`LinearAttention`. Same parameter names and shapes as Llama's attention (wq, wk, wv, wo), so the Llama TP plan,
FSDP units, pipeline split and checkpoints apply unchanged; softmax layers of a hybrid are Llama's own.

A linear layer: q, k, v projections (grouped-query heads), the feature map on q and k (no RoPE: the decay and
the causal recurrence carry position), the "linear" slot (single-process kernel, or LASP-2 under sequence
parallelism), a weightless RMS norm over each head's output, and wo.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from meshweave.models.attention_api import AttentionMeta
from meshweave.models.linear_attention import LinearAttentionSlot, apply_feature_map, head_log_decay
from meshweave.models.linear_llama.config import LinearLlamaConfig, layer_kinds
from meshweave.models.llama.model import Transformer


class HeadDecay(nn.Module):
    """Holds log(lambda) per query head (a non-persistent buffer, or None); tensor parallelism keeps the slice of
    this rank's heads (see parts.ShardHeads)."""

    def __init__(self, kind: str, n_heads: int) -> None:
        super().__init__()
        log_decay = head_log_decay(kind, n_heads)
        self.register_buffer("log_decay", None if log_decay is None else log_decay.float(), persistent=False)

    def forward(self) -> torch.Tensor | None:
        return self.log_decay


class LinearAttention(nn.Module):
    def __init__(self, cfg: LinearLlamaConfig) -> None:
        super().__init__()
        self.head_dim, self.feature_map, self.eps = cfg.head_dim, cfg.feature_map, cfg.norm_eps
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.decay = HeadDecay(cfg.decay, cfg.n_heads)
        self.mixer = LinearAttentionSlot()

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMeta) -> torch.Tensor:
        """Same signature as Llama's attention (rope unused), so blocks and TP plans are shared."""
        b, s, _ = x.shape
        # -1 for heads: under tensor parallelism each rank holds a slice of the heads.
        q = apply_feature_map(self.feature_map, self.wq(x).view(b, s, -1, self.head_dim))
        k = apply_feature_map(self.feature_map, self.wk(x).view(b, s, -1, self.head_dim))
        v = self.wv(x).view(b, s, -1, self.head_dim)
        out = self.mixer(q, k, v, meta, self.decay())
        out = F.rms_norm(out, (self.head_dim,), eps=self.eps)
        return self.wo(out.reshape(b, s, -1))


def build(cfg: LinearLlamaConfig) -> Transformer:
    """The Llama decoder with `LinearAttention` in its linear layers, re-initialised as a whole."""
    model = Transformer(cfg)
    for i, kind in enumerate(layer_kinds(cfg)):
        if kind == "linear":
            model.layers[str(i)].attention = LinearAttention(cfg)
    model.reset_parameters()
    return model
