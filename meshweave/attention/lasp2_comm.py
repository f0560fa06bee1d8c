"""The communication of LASP-2 (and of its LASP-1 peer's document bookkeeping), kept apart from the math.

Per layer call: one all-gather of the memory states in forward, one of their gradients in backward, each
started asynchronously so that the intra-segment work runs while it is in flight. Per batch (cached):
one all-gather of each segment's first and last document id, when there are document ids.

Hand-written async all-gather: `CommGroup.all_gather` blocks, and overlapping the gather with the
intra-chunk work is the point of LASP-2. The call is accounted in the group's ledger exactly as
`CommGroup.all_gather` accounts it (op "all_gather", payload = the local tensor's bytes), refuses a tensor on
the wrong device with one line, and reports a failure naming rank, group and op. (It belongs in CommGroup as
an `all_gather_async`; it lives here until that exists.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshweave.core.comm import CommError, CommGroup

_all_gather_flat = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def _where(group: CommGroup) -> str:
    me = dist.get_rank() if dist.is_initialized() else 0
    return f"rank {me}: all_gather on group '{group.name}' (global ranks {group.ranks})"


class PendingGather:
    """An all-gather in flight; `wait()` returns the (group.size, *shape) result, indexed by group rank."""

    def __init__(self, out: torch.Tensor, work, group: CommGroup) -> None:
        self._out, self._work, self._group = out, work, group

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            try:
                self._work.wait()
            except RuntimeError as err:
                raise CommError(f"{_where(self._group)} failed: {err}") from err
            self._work = None
        return self._out


def start_all_gather(group: CommGroup, tensor: torch.Tensor) -> PendingGather:
    """Start gathering every rank's `tensor` (equal shapes); nothing is sent on a group of one.

    Communicates: one all_gather of `tensor` over `group` (ledger: "all_gather", tensor bytes).
    """
    if group.size == 1:
        return PendingGather(tensor[None], None, group)
    if group.device_type is not None and tensor.device.type != group.device_type:
        raise CommError(f"{_where(group)} got a {tensor.device.type} tensor, but this group's backend takes "
                        f"{group.device_type} tensors; move it to the compute device first")
    src = tensor.contiguous()[None]  # (1, *shape): the flat gather concatenates along dim 0
    group.ledger.record(group.name, "all_gather", src.numel() * src.element_size())
    out = src.new_empty((group.size, *src.shape[1:]))
    try:
        work = _all_gather_flat(out, src, group=group.pg, async_op=True)
    except RuntimeError as err:
        raise CommError(f"{_where(group)} failed: {err}") from err
    return PendingGather(out, work, group)


def gather_boundaries(group: CommGroup, boundaries: torch.Tensor) -> torch.Tensor:
    """Every rank's (n_segments, B, 3) boundary facts (first id, last id, one-run flag), as (size, n_segments, B, 3).

    Communicates: one all_gather of `boundaries` (once per batch: the caller caches the result).
    """
    return group.all_gather(boundaries.contiguous()[None], dim=0)
