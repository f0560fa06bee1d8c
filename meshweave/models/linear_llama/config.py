"""`LinearLlamaConfig` and `HybridConfig`: the `model:` sections of kinds `linear_llama` and `hybrid` (torch-free).

Both are the Llama decoder's fields plus the linear layers' token mixer: a feature map applied to q and k, and an
optional fixed per-head decay (the state shrinks by lambda_h per token, as in Lightning Attention / RetNet). Each
linear layer RMS-normalises every head's output (no denominator in the attention itself), so every feature map
works with and without decay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meshweave.core.schema import AtLeast1
from meshweave.models.llama.config import LlamaConfig

FeatureMap = Literal["identity", "elu1", "relu", "silu"]
Decay = Literal["none", "alibi", "retnet"]


@dataclass
class LinearLlamaConfig(LlamaConfig):
    kind: Literal["linear_llama"] = "linear_llama"
    feature_map: FeatureMap = "elu1"  # on q and k: identity | elu1 (elu(x)+1) | relu | silu
    decay: Decay = "alibi"  # per-head state decay: none | alibi (exp(-2^(-8(h+1)/H))) | retnet (1 - 2^(-5-h))


@dataclass
class HybridConfig(LinearLlamaConfig):
    kind: Literal["hybrid"] = "hybrid"  # type: ignore[assignment]
    softmax_every: AtLeast1 = 4  # layers k-1, 2k-1, ... (every k-th) keep softmax attention; the rest are linear


def slot_kinds(cfg: LinearLlamaConfig) -> frozenset[str]:
    """The kinds `layer_kinds` lists, computed without listing the layers."""
    every = getattr(cfg, "softmax_every", 0)
    kinds = {"softmax"} if 1 <= every <= cfg.n_layers else set()
    if every != 1 and cfg.n_layers >= 1:  # every layer is softmax only when every = 1
        kinds.add("linear")
    return frozenset(kinds)


def layer_kinds(cfg: LinearLlamaConfig) -> list[str]:
    """The token mixer of each layer, in order: "linear" or "softmax" (also the attention slot kinds)."""
    every = getattr(cfg, "softmax_every", 0)
    return ["softmax" if every > 0 and (i + 1) % every == 0 else "linear" for i in range(cfg.n_layers)]
