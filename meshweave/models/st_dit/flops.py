"""Parameter and FLOP counts of `st_dit` (torch-free)."""

from __future__ import annotations

from meshweave.models.st_dit.config import STDiTConfig


def block_params(cfg: STDiTConfig) -> int:
    d, h = cfg.dim, cfg.mlp_hidden
    return (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d) + (6 * d * d + 6 * d)


def embedding_params(cfg: STDiTConfig) -> int:
    """Patch embedding and the timestep MLP."""
    return (cfg.patch_width * cfg.dim + cfg.dim) + (cfg.freq_dim * cfg.dim + cfg.dim) + (cfg.dim * cfg.dim + cfg.dim)


def final_params(cfg: STDiTConfig) -> int:
    return (2 * cfg.dim * cfg.dim + 2 * cfg.dim) + (cfg.dim * cfg.patch_width + cfg.patch_width)


def parameter_count(cfg: STDiTConfig) -> int:
    return embedding_params(cfg) + 2 * cfg.n_layers * block_params(cfg) + final_params(cfg)


def flops_per_token(cfg: STDiTConfig, seq_len: int = 0) -> float:
    """Training FLOPs (fwd + bwd = 3x fwd) per video token: 2 per matmul parameter of the blocks, plus attention
    over the S tokens of a frame (spatial blocks) and the T frames of a patch (temporal blocks)."""
    d = cfg.dim
    attention = 2 * 2 * d * (cfg.tokens_per_frame + cfg.frames)  # QK^T and AV, one spatial and one temporal block
    matmuls = 2 * (2 * cfg.n_layers * (block_params(cfg) - 6 * d * d) + cfg.patch_width * d + d * cfg.patch_width)
    return 3.0 * (matmuls + cfg.n_layers * attention)
