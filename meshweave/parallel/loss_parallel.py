"""Vocab-parallel loss: the loss of outputs sharded over the vocabulary, never gathered.

Uses torch's `torch.distributed.tensor.parallel.loss_parallel` (it works on gloo/CPU): inside that
context, cross-entropy of a DTensor sharded on the class dimension computes a local log-softmax
with all-reduces of the per-token max and sum-of-exponentials over the tensor-parallel mesh, and
picks each target's logit on the rank that owns it. Its backward must also run inside the
context, so the runners enter `loss_parallel_context()` around forward *and* backward. Which models
want it is their spec's `loss_parallel` flag.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel


def loss_parallel_context(enabled: bool) -> AbstractContextManager:
    """The context in which forward and backward of a vocab-parallel loss must run (no-op if disabled)."""
    return loss_parallel() if enabled else nullcontext()


def local_loss(loss: torch.Tensor) -> torch.Tensor:
    """A loss computed by loss_parallel is a replicated DTensor: the full sum, as a plain tensor on every
    tensor-parallel rank (differentiable). A plain loss is returned as it is."""
    return loss.to_local() if isinstance(loss, DTensor) else loss
