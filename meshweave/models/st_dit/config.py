"""`STDiTConfig`: the `model:` section for `kind: st_dit` (torch-free, so config loading stays fast)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meshweave.core.schema import AtLeast1, Positive


@dataclass
class STDiTConfig:
    kind: Literal["st_dit"] = "st_dit"
    frames: AtLeast1 = 8  # latent frames T per clip; 1 = images
    height: AtLeast1 = 16  # latent height (the built-in videos are rendered at 2x this and space-to-depth encoded)
    width: AtLeast1 = 16  # latent width
    channels: AtLeast1 = 4  # latent channels
    patch: AtLeast1 = 2  # spatial patch: height/patch * width/patch tokens per frame
    dim: AtLeast1 = 128  # residual width
    n_layers: AtLeast1 = 4  # ST blocks, each a spatial block then a temporal block
    n_heads: AtLeast1 = 4
    mlp_ratio: Positive = 4.0  # MLP hidden = mlp_ratio * dim
    norm_eps: Positive = 1e-6  # LayerNorm epsilon
    init_std: Positive = 0.02  # std of the normal weight init
    freq_dim: AtLeast1 = 256  # sinusoidal timestep features before the timestep MLP

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def tokens_per_frame(self) -> int:
        return (self.height // self.patch) * (self.width // self.patch)

    @property
    def patch_width(self) -> int:
        """Values per token of the latents (and of the predicted velocity)."""
        return self.channels * self.patch * self.patch

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_ratio * self.dim)


SPATIAL, TEMPORAL = 2, 1  # the activation dim each kind of block attends over: (B, T, S, C)


def block_attends(cfg: STDiTConfig) -> list[int]:
    """Spatial then temporal, n_layers times."""
    return [SPATIAL, TEMPORAL] * cfg.n_layers
