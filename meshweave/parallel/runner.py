"""Step runners: run forward + backward for one optimizer step's local batch.

A runner hides how a model is executed (whole model on each rank, or a pipeline schedule). The
trainer only calls `forward_backward(batch, global_targets)` and gets back this rank's summed
token loss (0 on ranks that do not compute the loss, e.g. non-last pipeline stages).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from meshweave.runtime.data import IGNORE_INDEX, Batch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BatchSharder = Callable[[Batch], Batch]


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of token cross-entropy in fp32; IGNORE_INDEX targets excluded."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


class StepRunner(Protocol):
    model_parts: list[nn.Module]

    def forward_backward(self, batch: Batch, global_targets: int) -> torch.Tensor:
        """Accumulate gradients of sum(loss)/global_targets over `batch`; return the local loss sum."""
        ...


def gradient_sync(model: nn.Module, enabled: bool):
    """Context in which backward reduces gradients over data parallelism only if `enabled`:
    micro-steps before the last one of an accumulation just accumulate locally."""
    if isinstance(model, DistributedDataParallel):
        return nullcontext() if enabled else model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


class LocalRunner:
    """Whole model on this rank; `grad_accum` micro-steps; sequence sharding applied per micro-step."""

    def __init__(self, model: nn.Module, grad_accum: int, loss_fn: LossFn = cross_entropy_sum,
                 shard: BatchSharder | None = None, autocast_dtype: torch.dtype | None = None,
                 document_masking: bool = True, gradient_average_scale: int = 1) -> None:
        self.model = model
        self.gradient_average_scale = gradient_average_scale  # undo the dp x sp gradient averaging
        self.model_parts = [model]
        self.grad_accum, self.loss_fn, self.shard = grad_accum, loss_fn, shard
        self.autocast_dtype, self.document_masking = autocast_dtype, document_masking

    def forward_backward(self, batch: Batch, global_targets: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        per_step = batch.tokens.shape[0] // self.grad_accum
        for i in range(self.grad_accum):
            micro = batch.slice(i * per_step, (i + 1) * per_step)
            micro = self.shard(micro) if self.shard is not None else micro
            with gradient_sync(self.model, enabled=i == self.grad_accum - 1):
                total += self._forward_backward(micro, global_targets)
        return total

    def _forward_backward(self, micro: Batch, global_targets: int) -> torch.Tensor:
        device = next(self.model.parameters()).device
        with self._autocast(device):
            logits = self.model(micro.tokens.to(device), micro.position_ids.to(device),
                                micro.document_ids.to(device) if self.document_masking else None)
        loss_sum = self.loss_fn(logits, micro.labels.to(device))
        del logits  # free the largest activation before backward
        (loss_sum * (self.gradient_average_scale / global_targets)).backward()
        return loss_sum.detach().double().cpu()

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)
