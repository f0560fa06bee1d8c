"""A spatial-temporal diffusion transformer (Open-Sora / Latte style) on video latents.

latents (B, T, C, H, W) -> patchify -> tokens (B, T, S, dim), S = (H/p)(W/p) -> blocks alternating spatial
(attention over the S tokens of one frame) and temporal (attention over the T frames of one patch), each with
adaLN timestep conditioning and an MLP -> adaLN final layer -> predicted velocity per token (B, T, S, C*p*p).

Layout conventions that the parallel layers rely on:
- every block attends over exactly one activation dim (`layout.attends`), with its own sinusoidal position
  encoding over that dim, so it runs unchanged on any part of the activations in which that dim is whole
  (and, given where its part starts, on a part of that dim whose attention slot communicates);
- a part (B', T', S') of the activations starting at (t0, s0) (`layout.start` of dims 1 and 2) holds, as its
  token (t, j), the token (t0 + t) * S + s0 + j of the row-major (T, S) grid (`grid_index`). For a box of
  frames and patches (s0 + S' <= S) that is frame t0 + t, patch s0 + j; a run of consecutive tokens of the
  flattened sequence (Ulysses as a generic runtime shards it) is one row, t0 = 0 and s0 its first token.
  Tokens past the end (padding) get positions past the end, whose values are never used;
- `layout` (a LayoutSlot) is where the activations are sharded and resharded between blocks (DSP);
- `layers` is a ModuleDict "0".."2L-1" (spatial, temporal, spatial, ...); attention runs in AttentionSlots of
  kinds "spatial" and "temporal" (non-causal);
- the output is this rank's real part of the prediction and where it starts (`VideoPrediction`); the loss
  compares it with the same part of the target.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from meshweave.models.attention_api import AttentionMeta, AttentionSlot
from meshweave.models.layout_api import LayoutSlot
from meshweave.models.st_dit.config import SPATIAL, STDiTConfig, block_attends


class VideoPrediction(NamedTuple):
    tokens: torch.Tensor  # (B', T', S', C*p*p): a part of the full (B, T, S, C*p*p) prediction
    starts: tuple[int, ...]  # where that part starts in dims B, T, S (T, S by the row-major rule, `grid_index`)


def grid_index(t0: int, s0: int, frames: int, tokens: int, per_frame: int, device: torch.device) -> torch.Tensor:
    """(frames, tokens) row-major indices into the flattened (T, S) grid (S = per_frame) of a part starting at
    (t0, s0): a box of frames and patches, or a run of consecutive tokens held as one row (see the module doc)."""
    rows = torch.arange(t0, t0 + frames, device=device)[:, None] * per_frame
    return rows + torch.arange(s0, s0 + tokens, device=device)[None]


def patchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, T, S, C*p*p), patches in row-major order."""
    b, t, c, h, w = latents.shape
    x = latents.reshape(b, t, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, t, (h // patch) * (w // patch), c * patch * patch)


def sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) positions -> (N, dim) sinusoidal features (cos half, sin half), in fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    angles = positions.to(torch.float32)[:, None] * freqs
    out = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return F.pad(out, (0, dim - 2 * half))


def spatial_positions(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """(h*w, dim): half the features encode the patch row, half the column."""
    rows = sincos(torch.arange(h, device=device), dim // 2)
    cols = sincos(torch.arange(w, device=device), dim - dim // 2)
    return torch.cat([rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)], dim=-1).reshape(h * w, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, ..., D) with per-sample shift/scale (B, D)."""
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return x * (1 + scale.view(view)) + shift.view(view)


class TimestepEmbedder(nn.Module):
    def __init__(self, cfg: STDiTConfig) -> None:
        super().__init__()
        self.freq_dim = cfg.freq_dim
        self.mlp = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sincos(t * 1000.0, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class FactorisedAttention(nn.Module):
    """Multi-head self-attention over one activation dim (`attends`) of x (B, T, S, D), the others batched."""

    def __init__(self, cfg: STDiTConfig, attends: int) -> None:
        super().__init__()
        self.attends, self.head_dim = attends, cfg.head_dim
        self.seq_len = cfg.tokens_per_frame if attends == SPATIAL else cfg.frames  # whole length of the attended dim
        # Separate q, k, v projections (not one fused qkv): a column-wise tensor-parallel split of each keeps whole
        # heads on every rank, where a split of a fused (3 * dim) output would hand rank 0 all of q and half of k.
        self.q, self.k, self.v = (nn.Linear(cfg.dim, cfg.dim) for _ in range(3))
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.mixer = AttentionSlot("spatial" if attends == SPATIAL else "temporal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.movedim(self.attends, -2)  # (B, other, N, D)
        lead, n = seq.shape[:-2], seq.shape[-2]
        seq = seq.reshape(-1, n, seq.shape[-1])
        # Heads held here: all of them, or dim / tp of them under tensor parallelism (the projections' local width).
        q, k, v = (proj(seq).unflatten(-1, (-1, self.head_dim)) for proj in (self.q, self.k, self.v))
        out = self.mixer(q, k, v, AttentionMeta(causal=False, seq_len=self.seq_len))
        return self.proj(out.reshape(*lead, n, -1)).movedim(-2, self.attends)


class MLP(nn.Module):
    def __init__(self, cfg: STDiTConfig) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cfg.dim, cfg.mlp_hidden), nn.Linear(cfg.mlp_hidden, cfg.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class STBlock(nn.Module):
    """adaLN (shift, scale, gate for attention and MLP from the timestep), attention over one dim, MLP."""

    def __init__(self, cfg: STDiTConfig, attends: int) -> None:
        super().__init__()
        self.cfg, self.attends = cfg, attends
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.attn = FactorisedAttention(cfg, attends)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.mlp = MLP(cfg)
        self.ada = nn.Linear(cfg.dim, 6 * cfg.dim)

    def positions(self, x: torch.Tensor, starts: tuple[int, int]) -> torch.Tensor:
        """(1, T', S', D) position encoding over the attended dim (the patch's row and column, or the frame) of
        x's tokens, x's part of the grid starting at `starts` (t0, s0) by the row-major rule of the module doc."""
        d, per_frame, (frames, tokens) = self.cfg.dim, self.cfg.tokens_per_frame, x.shape[1:3]
        index = grid_index(*starts, frames, tokens, per_frame, x.device)
        if self.attends == SPATIAL:
            h, w = self.cfg.height // self.cfg.patch, self.cfg.width // self.cfg.patch
            pos = spatial_positions(h, w, d, x.device)[index % per_frame]
        else:  # one encoding per frame the part touches (host arithmetic: first and last frame of the part)
            first, last = starts[0], starts[0] + frames - 1 + (starts[1] + tokens - 1) // per_frame
            pos = sincos(torch.arange(first, last + 1, device=x.device), d)[index // per_frame - first]
        return pos[None].to(x.dtype)

    def forward(self, x: torch.Tensor, c: torch.Tensor, starts: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """x (B, T', S', D): a part of the activations starting at `starts` (t0, s0) in the (T, S) grid."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c)).chunk(6, dim=-1)
        view = (x.shape[0], 1, 1, x.shape[-1])
        h = modulate(self.norm1(x), shift1, scale1) + self.positions(x, starts)
        x = x + gate1.view(view) * self.attn(h)
        return x + gate2.view(view) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, cfg: STDiTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.linear = nn.Linear(cfg.dim, cfg.patch_width)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(F.silu(c)).chunk(2, dim=-1)
        # A copy, not nn.Linear's view of its 2-D result: FSDP2 warns on (and in-place ops would break) view outputs.
        return self.linear(modulate(self.norm(x), shift, scale)).clone()


class STDiT(nn.Module):
    def __init__(self, cfg: STDiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Linear(cfg.patch_width, cfg.dim)
        self.t_embed = TimestepEmbedder(cfg)
        attends = block_attends(cfg)
        self.layers = nn.ModuleDict({str(i): STBlock(cfg, a) for i, a in enumerate(attends)})
        self.final = FinalLayer(cfg)
        self.layout = LayoutSlot(attends)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal weights, zero biases. The adaLN projections are not zero-initialised (adaLN-Zero) so that every
        parameter has a gradient from the first step (the equivalence tests compare all of them)."""
        for p in self.parameters():
            if p.dim() == 1:
                nn.init.zeros_(p)
            else:
                nn.init.trunc_normal_(p, std=self.cfg.init_std, a=-3 * self.cfg.init_std, b=3 * self.cfg.init_std)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor) -> VideoPrediction:
        """latents (B, T, C, H, W) noisy; timesteps (B,) in [0, 1]. Returns this rank's part of the velocity."""
        x = self.patch_embed(patchify(latents, self.cfg.patch))  # (B, T, S, dim)
        sizes = x.shape[:3]
        c = self.t_embed(timesteps)
        x = self.layout.enter(x)
        for i, block in enumerate(self.layers.values()):
            x = self.layout.before_block(x, sizes, i)
            starts = (self.layout.start(sizes, i, 1), self.layout.start(sizes, i, 2))  # of frames and patches
            x = block(x, self.layout.samples(c, sizes, i), starts)
        x, starts = self.layout.exit(x, sizes)
        c = c.narrow(0, starts[0], x.shape[0])  # the batch dim may be sharded (images)
        return VideoPrediction(self.final(x, c), starts)
