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


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype, reshard_after_forward: bool = True) -> nn.Module:
    """Shard every transformer block, then the root (embeddings, norm, head), over `mesh`.

    Communicates: all-gather of parameters before each block's forward/backward, reduce-scatter
    of gradients after its backward (summed: divide factor 1).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def apply_ddp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Replicate the model over `mesh`; gradients all-reduced (averaged) in buckets during backward."""
    device_ids = [torch.cuda.current_device()] if mesh.device_type == "cuda" else None
    return DistributedDataParallel(model, process_group=mesh.get_group(), device_ids=device_ids)
