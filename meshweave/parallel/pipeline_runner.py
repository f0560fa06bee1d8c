"""PipelineRunner: one optimizer step's forward + backward through a pipeline schedule.

Token-weighted loss: each microbatch's loss is its *summed* token cross-entropy divided by the
number of target tokens in the whole global batch (times the dp x sp gradient-averaging scale, as
in LocalRunner), so the accumulated gradient equals the unpipelined step's exactly — a
per-microbatch mean would weight microbatches with few targets too heavily.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn as nn

from meshweave.parallel.loss_parallel import loss_parallel_context, vocab_parallel_cross_entropy_sum
from meshweave.parallel.runner import BatchSharder
from meshweave.runtime.data import Batch


class TokenWeightedLoss:
    """The schedule's loss_fn: sum CE * scale / global_targets, remembering each microbatch's raw sum."""

    def __init__(self, gradient_average_scale: int) -> None:
        self.gradient_average_scale = gradient_average_scale
        self.global_targets = 1
        self.sums: list[torch.Tensor] = []

    def start_step(self, global_targets: int) -> None:
        self.global_targets, self.sums = global_targets, []

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss_sum = vocab_parallel_cross_entropy_sum(logits, labels)
        self.sums.append(loss_sum.detach().double().cpu())
        return loss_sum * (self.gradient_average_scale / self.global_targets)


class PipelineRunner:
    """Runs a `torch.distributed.pipelining` schedule over this rank's stages.

    Every rank passes the whole local batch: the schedule splits it into microbatches, feeds the
    tokens to stage 0, the labels to the loss after the last stage, and position / document ids
    to every stage as keyword arguments. Returns this rank's loss sum (0 where no last stage is held).
    """

    def __init__(self, schedule, stages: list, model_parts: list[nn.Module], loss: TokenWeightedLoss, microbatches: int,
                 shard: BatchSharder | None = None, document_masking: bool = True, loss_parallel: bool = False,
                 autocast_dtype: torch.dtype | None = None,
                 traffic: Callable[[], AbstractContextManager] | None = None) -> None:
        self.autocast_dtype, self.microbatches, self.traffic = autocast_dtype, microbatches, traffic
        self.schedule, self.stages, self.model_parts, self.loss = schedule, stages, model_parts, loss
        self.shard, self.document_masking, self.loss_parallel = shard, document_masking, loss_parallel
        self.device = next(model_parts[0].parameters()).device

    def forward_backward(self, batch: Batch, global_targets: int) -> torch.Tensor:
        """Accumulate gradients of sum(loss)/global_targets over `batch`; return the local loss sum."""
        batch = self.shard(batch) if self.shard is not None else batch
        kwargs = {"position_ids": batch.position_ids.to(self.device)}
        if self.document_masking:
            kwargs["document_ids"] = batch.document_ids.to(self.device)
        self.loss.start_step(global_targets)
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        traffic = self.traffic() if self.traffic is not None else nullcontext()
        with loss_parallel_context(self.loss_parallel), autocast, traffic:
            self.schedule.step(batch.tokens.to(self.device), target=batch.labels.to(self.device),
                               return_outputs=False, **kwargs)
        # On the first step torch's shape inference calls the loss once more on a dummy batch: keep
        # only the sums of the real microbatches (the last ones computed).
        sums = self.loss.sums[-self.microbatches:]
        return torch.stack(sums).sum() if sums else torch.zeros((), dtype=torch.float64)
