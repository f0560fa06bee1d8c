"""Vocab-parallel cross-entropy: the loss of logits sharded over the vocabulary, never gathered.

Uses torch's `torch.distributed.tensor.parallel.loss_parallel` (it works on gloo/CPU): inside that
context, cross-entropy of a DTensor sharded on the class dimension computes a local log-softmax
with all-reduces of the per-token max and sum-of-exponentials over the tensor-parallel mesh, and
picks each target's logit on the rank that owns it. Its backward must also run inside the
context, so the runners enter `loss_parallel_context()` around forward *and* backward.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from meshweave.parallel.runner import cross_entropy_sum


def loss_parallel_context(enabled: bool) -> AbstractContextManager:
    """The context in which forward and backward of a vocab-parallel loss must run (no-op if disabled)."""
    return loss_parallel() if enabled else nullcontext()


def vocab_parallel_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed token cross-entropy; for vocab-sharded DTensor logits, a plain tensor that holds the
    full sum on every tensor-parallel rank (differentiable). Communicates (inside loss_parallel):
    all-reduces over the tp mesh of per-token max, sum of exponentials and target logit."""
    loss = cross_entropy_sum(logits, labels)
    return loss.to_local() if isinstance(loss, DTensor) else loss


class LossParallelRunner:
    """Wraps a step runner so that its forward and backward run inside `loss_parallel()` (and inside
    `traffic()`, e.g. the tensor-parallel traffic counter, when given)."""

    def __init__(self, inner, traffic: Callable[[], AbstractContextManager] | None = None) -> None:
        self.inner, self.traffic = inner, traffic
        self.model_parts = inner.model_parts

    def forward_backward(self, batch, global_targets: int) -> torch.Tensor:
        """The inner runner's step, with vocab-parallel cross-entropy enabled (tp all-reduces per microbatch)."""
        with loss_parallel(), (self.traffic() if self.traffic is not None else nullcontext()):
            return self.inner.forward_backward(batch, global_targets)
