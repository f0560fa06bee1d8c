"""The communication of LASP-2 (and of its LASP-1 peer's document bookkeeping), kept apart from the math.

Per layer call: one all-gather of the memory states in forward, one of their gradients in backward, each
started asynchronously (`CommGroup.all_gather_async`) so that the intra-segment work runs while it is in flight.
Per batch (cached): one all-gather of each segment's first and last document id, when there are document ids.
"""

from __future__ import annotations

import torch

from meshweave.core.comm import CommGroup, PendingAllGather


def start_all_gather(group: CommGroup, tensor: torch.Tensor) -> PendingAllGather:
    """Start gathering every rank's `tensor` (equal shapes); `wait()` gives (group.size, *shape) by group rank.
    Nothing is sent on a group of one.

    Communicates: one all_gather of `tensor` over `group` (ledger: "all_gather", tensor bytes).
    """
    return group.all_gather_async(tensor.unsqueeze(0), dim=0)


def gather_boundaries(group: CommGroup, boundaries: torch.Tensor) -> torch.Tensor:
    """Every rank's (n_segments, B, 3) boundary facts (first id, last id, one-run flag), as (size, n_segments, B, 3).

    Communicates: one all_gather of `boundaries` (once per batch: the caller caches the result).
    """
    return group.all_gather(boundaries.contiguous()[None], dim=0)
