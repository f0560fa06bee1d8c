"""Data parallelism over the dp x sp ranks: FSDP2 (`fully_shard`) or DDP.

Both average gradients over the dp x sp ranks (their default). The runner multiplies each rank's
loss by that rank count (`gradient_average_scale`) and divides it by the number of target tokens
in the whole global batch, so the average is exactly the gradient one process would compute on
that batch, whatever the layout. (Summing directly would need FSDP2's divide factor 1, which
uses ReduceOp.PREMUL_SUM: gloo does not have it.)
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from meshweave.core.comm import CommLedger
from meshweave.models.spec import FsdpUnit
from meshweave.parallel.data_parallel_comm import CountedAllReduceState, count_fsdp_traffic, counted_allreduce_hook


def apply_fsdp(model: nn.Module, units: list[FsdpUnit], mesh: DeviceMesh, param_dtype: torch.dtype,
               reshard_after_forward: bool = True, ledger: CommLedger | None = None, group_name: str = "dp_sp") -> nn.Module:
    """Shard over `mesh` in the spec's units (for Llama: the embeddings, each block, [final norm + head]),
    then the root.

    Communicates (recorded in `ledger` under `group_name` when given): an all-gather of a unit's
    parameters before its forward and again before its backward, except units kept gathered (the head:
    its backward comes right after its forward); a reduce-scatter of each unit's gradients after its
    backward (averaged over the mesh).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)

    def shard(modules, reshard: bool):
        unit = fully_shard(modules, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
        return unit[0] if isinstance(unit, list) else unit

    sharded = [shard(u.modules if len(u.modules) > 1 else u.modules[0], reshard_after_forward and not u.keep_gathered)
               for u in units]
    sharded.append(shard(model, reshard_after_forward))
    if ledger is not None:
        count_fsdp_traffic(sharded, ledger, group_name)
    return model


def apply_ddp(model: nn.Module, mesh: DeviceMesh, ledger: CommLedger | None = None, group_name: str = "dp_sp") -> nn.Module:
    """Replicate the model over `mesh`; gradients all-reduced (averaged) in buckets during backward,
    each bucket recorded in `ledger` under `group_name`."""
    device_ids = [torch.cuda.current_device()] if mesh.device_type == "cuda" else None
    ddp = DistributedDataParallel(model, process_group=mesh.get_group(), device_ids=device_ids)
    if ledger is not None:
        ddp.register_comm_hook(CountedAllReduceState(mesh.get_group(), ledger, group_name), counted_allreduce_hook)
    return ddp
