"""The torch side of the linear kinds' specs: the Llama parts plus the per-head decay under tensor parallelism."""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle

from meshweave.models.linear_llama.model import LinearAttention
from meshweave.models.llama import parts as llama_parts
from meshweave.models.llama.model import Transformer


class ShardHeads(ParallelStyle):
    """Keep this tp rank's slice of a `HeadDecay`'s per-head buffer: wq/wk/wv are split column-wise, so a rank
    holds a contiguous run of heads and its slot sees only those. Local slicing of a constant: no communication."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if module.log_decay is not None:
            module.log_decay = module.log_decay.chunk(device_mesh.size())[device_mesh.get_local_rank()].clone()
        return module


def tensor_parallel_plan(model: Transformer) -> dict[str, ParallelStyle]:
    """Llama's plan (same parameter names in linear and softmax layers) plus the decay slice of each linear layer."""
    plan = llama_parts.tensor_parallel_plan(model)
    for name, block in model.layers.items():
        if isinstance(block.attention, LinearAttention) and block.attention.decay.log_decay is not None:
            plan[f"layers.{name}.attention.decay"] = ShardHeads()
    return plan
