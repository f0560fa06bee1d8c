"""Step runners: run forward + backward for one optimizer step's local batch.

A runner hides how a model is executed (whole model on each rank, or a pipeline schedule). The
trainer calls `forward_backward(batch, global_targets)` with the batch and the global target count
already on the compute device, and gets back this rank's summed loss as a device tensor (0 on ranks
that do not compute the loss, e.g. non-last pipeline stages). Nothing here synchronises with the
host: the loss reaches the host only when the trainer logs it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from meshweave.core.batch import Batch
from meshweave.models.spec import ModelSpec
from meshweave.parallel.loss_parallel import local_loss, loss_parallel_context

BatchSharder = Callable[[Batch], Batch]
TrafficContext = Callable[[], AbstractContextManager]


@dataclass(frozen=True)
class ModelIO:
    """How a batch feeds the model and its loss, from the model's spec."""

    input_field: str
    kwarg_fields: tuple[str, ...]
    target_field: str
    spec_loss_sum: Callable[[Any, torch.Tensor], torch.Tensor]
    loss_parallel: bool  # run forward and backward inside torch's loss_parallel() (vocab-sharded output)

    @classmethod
    def of(cls, spec: ModelSpec, loss_parallel: bool = False) -> ModelIO:
        return cls(spec.input_field, spec.kwarg_fields, spec.target_field, spec.loss_sum, loss_parallel)

    def kwargs(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The keyword inputs the batch has (a field may be absent, e.g. document ids without masking)."""
        return {name: batch.fields[name] for name in self.kwarg_fields if name in batch}

    def loss_sum(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        """The spec's summed loss as a plain tensor (a vocab-parallel loss's DTensor made local)."""
        return local_loss(self.spec_loss_sum(output, target))


def scaled_for_backward(loss_sum: torch.Tensor, gradient_average_scale: int, global_targets: torch.Tensor) -> torch.Tensor:
    """loss_sum * scale / global_targets: backward then yields this rank's share of the global-mean gradient.

    `gradient_average_scale` (dp x sp) undoes the average that FSDP2/DDP take over those ranks."""
    return loss_sum * (gradient_average_scale / global_targets).to(loss_sum.dtype)


class StepRunner(Protocol):
    model_parts: list[nn.Module]

    def forward_backward(self, batch: Batch, global_targets: torch.Tensor) -> torch.Tensor:
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


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class LocalRunner:
    """Whole model on this rank; `grad_accum` micro-steps; sequence sharding applied per micro-step."""

    def __init__(self, model: nn.Module, io: ModelIO, grad_accum: int, shard: BatchSharder | None = None,
                 autocast_dtype: torch.dtype | None = None, gradient_average_scale: int = 1,
                 traffic: TrafficContext | None = None) -> None:
        self.model, self.io, self.grad_accum, self.shard = model, io, grad_accum, shard
        self.model_parts = [model]
        self.autocast_dtype, self.gradient_average_scale, self.traffic = autocast_dtype, gradient_average_scale, traffic
        self.device = next(model.parameters()).device

    def forward_backward(self, batch: Batch, global_targets: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        per_step = batch.size // self.grad_accum
        with loss_parallel_context(self.io.loss_parallel), (self.traffic() if self.traffic else nullcontext()):
            for i in range(self.grad_accum):
                micro = batch.slice(i * per_step, (i + 1) * per_step)
                micro = self.shard(micro) if self.shard is not None else micro
                with gradient_sync(self.model, enabled=i == self.grad_accum - 1):
                    total += self._forward_backward(micro, global_targets)
        return total

    def _forward_backward(self, micro: Batch, global_targets: torch.Tensor) -> torch.Tensor:
        micro = micro.to(self.device)
        with autocast_context(self.device, self.autocast_dtype):
            output = self.model(micro.fields[self.io.input_field], **self.io.kwargs(micro))
        loss_sum = self.io.loss_sum(output, micro.fields[self.io.target_field])
        del output  # free the largest activation before backward
        scaled_for_backward(loss_sum, self.gradient_average_scale, global_targets).backward()
        return loss_sum.detach().double()
