"""Tensor parallelism (Megatron-style, with sequence-parallel norms) from the model spec's DTensor plan.

The plan is data that the model kind supplies (module path -> `torch.distributed.tensor.parallel`
style; see models/llama/parts.py for the Llama plan and its communication): this module only applies
it over the tp mesh. Everything that crosses a block boundary (and hence a pipeline stage boundary)
stays a plain local tensor, so pipeline P2P carries only this rank's shard.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import parallelize_module


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, plan: dict[str, Any]) -> nn.Module:
    """Shard `model` in place over `tp_mesh` with `plan`.

    For the Llama plan this communicates over the tp mesh, per block and per microbatch: forward one
    all-gather of the (batch, seq/tp, dim) activations before attention and before the FFN, one
    reduce-scatter of (batch, seq, dim) partial sums after wo and after w2; backward the mirror images.
    The embedding adds a reduce-scatter (forward) and the head an all-gather (forward), mirrored in backward.
    """
    if tp_mesh.size() == 1:
        return model
    return parallelize_module(model, tp_mesh, plan)
