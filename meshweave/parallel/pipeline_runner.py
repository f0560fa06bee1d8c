"""PipelineRunner: one optimizer step's forward + backward through a pipeline schedule.

Token-weighted loss: each microbatch's loss is its *summed* loss divided by the number of targets
in the whole global batch (times the dp x sp gradient-averaging scale, as in LocalRunner), so the
accumulated gradient equals the unpipelined step's exactly — a per-microbatch mean would weight
microbatches with few targets too heavily.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn

from meshweave.core.batch import Batch
from meshweave.parallel.loss_parallel import loss_parallel_context
from meshweave.parallel.runner import BatchSharder, ModelIO, TrafficContext, autocast_context, scaled_for_backward


class TokenWeightedLoss:
    """The schedule's loss_fn: summed loss * scale / global_targets, remembering each microbatch's raw sum."""

    def __init__(self, loss_sum: Callable[[Any, torch.Tensor], torch.Tensor], gradient_average_scale: int) -> None:
        self.loss_sum, self.gradient_average_scale = loss_sum, gradient_average_scale
        self.global_targets = torch.ones(())
        self.sums: list[torch.Tensor] = []

    def start_step(self, global_targets: torch.Tensor) -> None:
        self.global_targets, self.sums = global_targets, []

    def __call__(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        loss_sum = self.loss_sum(output, target)
        self.sums.append(loss_sum.detach().double())
        return scaled_for_backward(loss_sum, self.gradient_average_scale, self.global_targets)


class PipelineRunner:
    """Runs a `torch.distributed.pipelining` schedule over this rank's stages.

    Every rank passes the whole local batch: the schedule splits it into microbatches, feeds the
    model's input field to stage 0, the target field to the loss after the last stage, and the
    keyword fields to every stage. Returns this rank's loss sum (0 where no last stage is held).
    """

    def __init__(self, schedule, stages: list, model_parts: list[nn.Module], loss: TokenWeightedLoss, io: ModelIO,
                 microbatches: int, shard: BatchSharder | None = None, autocast_dtype: torch.dtype | None = None,
                 traffic: TrafficContext | None = None) -> None:
        self.schedule, self.stages, self.model_parts, self.loss, self.io = schedule, stages, model_parts, loss, io
        self.microbatches, self.shard, self.autocast_dtype, self.traffic = microbatches, shard, autocast_dtype, traffic
        self.device = next(model_parts[0].parameters()).device

    def forward_backward(self, batch: Batch, global_targets: torch.Tensor) -> torch.Tensor:
        """Accumulate gradients of sum(loss)/global_targets over `batch`; return the local loss sum."""
        batch = (self.shard(batch) if self.shard is not None else batch).to(self.device)
        self.loss.start_step(global_targets)
        traffic = self.traffic() if self.traffic is not None else nullcontext()
        with loss_parallel_context(self.io.loss_parallel), autocast_context(self.device, self.autocast_dtype), traffic:
            self.schedule.step(batch.fields[self.io.input_field], target=batch.fields[self.io.target_field],
                               return_outputs=False, **self.io.kwargs(batch))
        # On the first step torch's shape inference calls the loss once more on a dummy batch: keep
        # only the sums of the real microbatches (the last ones computed).
        sums = self.loss.sums[-self.microbatches:]
        return torch.stack(sums).sum() if sums else torch.zeros((), dtype=torch.float64, device=self.device)
