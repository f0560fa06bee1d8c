"""AdamW (fused on GPU), warm-up + cosine LR, and global gradient-norm clipping across every mesh axis."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from meshweave.core.comm import CommGroup
from meshweave.core.schema import TrainConfig


def build_optimizer(parts: list[nn.Module], cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    params = [p for m in parts for p in m.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # norms
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device_type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused, foreach=not fused)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1 over warmup_steps, then cosine down to min_lr_ratio at the last step."""
    warmup = cfg.warmup
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, cfg.steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def global_grad_norm(parts: list[nn.Module], pp_group: CommGroup) -> torch.Tensor:
    """L2 norm of all gradients of the whole model, whatever the layout.

    Sharded (DTensor) gradients are reduced over their own mesh by DTensor; pipeline stages hold
    disjoint parameters, so squared norms are summed over the pp group.
    """
    grads = [p.grad for m in parts for p in m.parameters() if p.grad is not None]
    if not grads:
        device = next((p.device for m in parts for p in m.parameters()), torch.device("cpu"))
        norm = torch.zeros((), device=device)
    else:
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
    if pp_group.size > 1:
        squared = norm.float().pow(2)
        norm = pp_group.all_reduce(squared).sqrt()
    return norm


def clip_grad_norm(parts: list[nn.Module], max_norm: float, pp_group: CommGroup) -> torch.Tensor:
    """Scale gradients so the global norm is at most max_norm (0 = no clipping); return the norm."""
    norm = global_grad_norm(parts, pp_group)
    if max_norm > 0:
        params = [p for m in parts for p in m.parameters() if p.grad is not None]
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm
