"""Tensor-parallel traffic routed through the project's CommLedger.

DTensor (and `loss_parallel`) issue their collectives as functional collectives
(`torch.ops._c10d_functional.*`) below the autograd layer, forward and backward, so they never pass
through a CommGroup. `CountedTensorParallel` is a TorchDispatchMode — the mechanism torch's own
`CommDebugMode` uses, which counts calls but not bytes — that sees each of those ops and records
it (same payload convention as CommGroup: the bytes this rank hands in) under "tp" when the op
runs on a process group whose members are the tensor-parallel ranks (compared by members, not by
name: a reused process may hold several groups over the same ranks); collectives on other groups
are recorded under "dtensor". It changes nothing it sees.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from meshweave.core.comm import CommLedger

_functional = torch.ops._c10d_functional
# op -> (ledger op name, index of the argument holding the group name)
COUNTED_OPS = {
    _functional.all_gather_into_tensor.default: ("all_gather", 2),
    _functional.reduce_scatter_tensor.default: ("reduce_scatter", 3),
    _functional.all_reduce.default: ("all_reduce", 2),
    _functional.all_to_all_single.default: ("all_to_all", 3),
}


class CountedTensorParallel(TorchDispatchMode):
    """Records every functional collective issued while active (forward and backward)."""

    def __init__(self, ledger: CommLedger, tp_ranks: list[int], name: str = "tp") -> None:
        super().__init__()
        self.ledger, self.tp_ranks, self.name = ledger, list(tp_ranks), name
        self._is_tp: dict[str, bool] = {}

    def _group_label(self, group_name: str) -> str:
        if group_name not in self._is_tp:
            group = _resolve_process_group(group_name)
            self._is_tp[group_name] = dist.get_process_group_ranks(group) == self.tp_ranks
        return self.name if self._is_tp[group_name] else "dtensor"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            # Modes run before tensor subclasses: step aside so that DTensor desugars the op into
            # local ops and collectives, which then come back here on plain tensors.
            return NotImplemented
        entry = COUNTED_OPS.get(func)
        if entry is not None:
            op, group_arg = entry
            tensor = args[0]
            self.ledger.record(self._group_label(args[group_arg]), op, tensor.numel() * tensor.element_size())
        return func(*args, **(kwargs or {}))


def tensor_parallel_bytes(tokens: int, dim: int, tp: int, layers: int, has_embedding: bool, has_head: bool,
                          element_size: int = 4) -> dict[str, int]:
    """Analytic per-rank tensor-parallel payload of one forward+backward over `tokens` tokens
    (all microbatches of the step together) for a stage with `layers` blocks.

    Per block: all-gathers of the (tokens/tp, dim) sequence shard before attention and the FFN in
    forward, and their mirror all-gathers in backward (of the row-wise reduce-scatters) — 4 all-gathers
    of tokens*dim/tp values; the row-wise outputs' reduce-scatters of (tokens, dim) partial sums and
    their backward mirrors — 4 reduce-scatters of tokens*dim values. The embedding adds one
    reduce-scatter (forward) and one all-gather (backward); the head one all-gather (forward) and
    one reduce-scatter (backward); the vocab-parallel loss three fp32 all-reduces of one value per
    token (max, sum of exponentials, target logit).
    """
    units = 4 * layers + int(has_embedding) + int(has_head)
    out = {"all_gather": units * tokens * dim // tp * element_size,
           "reduce_scatter": units * tokens * dim * element_size}
    if has_head:
        out["all_reduce"] = 3 * tokens * 4
    return out
