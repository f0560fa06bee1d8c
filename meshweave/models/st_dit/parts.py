"""The torch side of the `st_dit` spec: FSDP units, checkpointing blocks, the flow-matching loss."""

from __future__ import annotations

import torch
import torch.nn as nn

from meshweave.core.batch import Batch
from meshweave.models.spec import FsdpUnit
from meshweave.models.st_dit.model import STDiT, VideoPrediction, grid_index, patchify


def fsdp_units(model: STDiT) -> list[FsdpUnit]:
    """Patch + timestep embedding, each block, the final layer (kept gathered: its backward follows at once)."""
    return ([FsdpUnit([model.patch_embed, model.t_embed])] + [FsdpUnit([b]) for b in model.layers.values()]
            + [FsdpUnit([model.final], keep_gathered=True)])


def blocks(model: STDiT) -> list[nn.Module]:
    return list(model.layers.values())


def velocity_mse_sum(output: VideoPrediction, velocity: torch.Tensor) -> torch.Tensor:
    """Sum over the values this rank predicted of (predicted - target velocity)^2, in fp32.

    `velocity` is the whole target (B, T, C, H, W); the prediction is a part of it in token layout, starting at
    `output.starts` in dims B, T, S (a box of frames and patches, or a run of the flattened tokens: model.grid_index),
    so every value of the batch is counted on exactly one rank. In fp32 at least."""
    pred, (b0, t0, s0) = output
    target = patchify(velocity, round((pred.shape[-1] // velocity.shape[2]) ** 0.5))
    index = grid_index(t0, s0, pred.shape[1], pred.shape[2], target.shape[2], target.device)
    target = target[b0:b0 + pred.shape[0]].flatten(1, 2)[:, index]
    dtype = torch.promote_types(pred.dtype, torch.float32)  # fp32 at least (fp64 stays fp64)
    return (pred.to(dtype) - target.to(dtype)).square().sum()


def count_targets(batch: Batch) -> torch.Tensor:
    """Every value of the target velocity (the loss is a mean over them)."""
    v = batch.velocity
    return torch.full((), v.numel(), dtype=torch.int64, device=v.device)
