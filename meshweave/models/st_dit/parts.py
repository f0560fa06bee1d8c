"""The torch side of the `st_dit` spec: TP plan, FSDP units, checkpointing blocks, the flow-matching loss."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from meshweave.core.batch import Batch
from meshweave.models.spec import FsdpUnit
from meshweave.models.st_dit.model import STDiT, VideoPrediction, grid_index, patchify


class ReplicateParallel(ParallelStyle):
    """A module kept whole on every tp rank: its parameters become Replicate DTensors, its tensor inputs (plain
    tensors, whole on every rank) are annotated Replicate and its outputs handed back as plain tensors.

    For the small parts of the plan not worth splitting. Plain parameters would work in the forward, but a model's
    gradients must be all DTensors or none (gradient-norm clipping refuses a mix), and FSDP2 then sees one kind.
    Communicates nothing: every tp rank repeats the work, and its parameter gradients are whole on each (the
    column-wise styles all-reduce the input gradients they hand back). torch has no such style (torchtitan writes
    the same as `NoParallel`); it lives here because models/ does not import parallel/."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, None, self._replicate_inputs, self._local_outputs)

    @staticmethod
    def _replicate_inputs(module: nn.Module, inputs: tuple[Any, ...], device_mesh: DeviceMesh) -> tuple[Any, ...]:
        return tuple(DTensor.from_local(x, device_mesh, (Replicate(),), run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    @staticmethod
    def _local_outputs(module: nn.Module, outputs: Any, device_mesh: DeviceMesh) -> Any:
        return outputs.to_local() if isinstance(outputs, DTensor) else outputs


# Tensor parallelism (Megatron-style), as data. The activations between and inside blocks stay whole (replicated)
# on the tp ranks, so DSP's all-to-alls (over sp) and the layout seam see plain tensors of the full width:
# - q, k, v column-wise (each rank holds n_heads / tp whole heads: separate projections, not a fused qkv), the
#   output projection row-wise (its partial sums all-reduced): one all-reduce forward, one backward per attention;
# - fc1 column-wise, fc2 row-wise: the same for the MLP;
# - adaLN modulation, the patch and timestep embeddings and the final layer replicated (small, per-sample or
#   per-token work that every rank repeats; their gradients are whole on every tp rank).
# No sequence-parallel norms: DSP or Ulysses already shard the tokens over sp.
BLOCK_PLAN: dict[str, ParallelStyle] = {
    "attn.q": ColwiseParallel(),
    "attn.k": ColwiseParallel(),
    "attn.v": ColwiseParallel(),
    "attn.proj": RowwiseParallel(),
    "mlp.fc1": ColwiseParallel(),
    "mlp.fc2": RowwiseParallel(),
    "ada": ReplicateParallel(),
}
TOP_LEVEL_PLAN: dict[str, ParallelStyle] = {
    "patch_embed": ReplicateParallel(),
    "t_embed.mlp": ReplicateParallel(),  # the MLP, not the embedder: its sinusoidal features stay plain tensors
    "final.ada": ReplicateParallel(),
    "final.linear": ReplicateParallel(),
}


def tensor_parallel_plan(model: STDiT) -> dict[str, ParallelStyle]:
    """The plan for the whole model (heads and MLP units split over tp; every other parameter replicated)."""
    blocks = {f"layers.{name}.{path}": style for name in model.layers for path, style in BLOCK_PLAN.items()}
    return {**TOP_LEVEL_PLAN, **blocks}


def fsdp_units(model: STDiT) -> list[FsdpUnit]:
    """Patch + timestep embedding, each block, the final layer (kept gathered: its backward follows at once)."""
    return ([FsdpUnit([model.patch_embed, model.t_embed])] + [FsdpUnit([b]) for b in model.layers.values()]
            + [FsdpUnit([model.final], keep_gathered=True)])


def blocks(model: STDiT) -> list[nn.Module]:
    return list(model.layers.values())


def velocity_mse_sum(output: VideoPrediction, velocity: torch.Tensor) -> torch.Tensor:
    """Sum over the values this rank predicted of (predicted - target velocity)^2, in fp32.

    `velocity` is the whole target (B, T, C, H, W); the prediction is a part of it in token layout, starting at
    `output.starts` in dims B, T, S (a box of frames and patches, or a run of the flattened tokens: model.grid_index),
    so every value of the batch is counted on exactly one rank. In fp32 at least."""
    pred, (b0, t0, s0) = output
    target = patchify(velocity, round((pred.shape[-1] // velocity.shape[2]) ** 0.5))
    index = grid_index(t0, s0, pred.shape[1], pred.shape[2], target.shape[2], target.device)
    target = target[b0:b0 + pred.shape[0]].flatten(1, 2)[:, index]
    dtype = torch.promote_types(pred.dtype, torch.float32)  # fp32 at least (fp64 stays fp64)
    return (pred.to(dtype) - target.to(dtype)).square().sum()


def count_targets(batch: Batch) -> torch.Tensor:
    """Every value of the target velocity (the loss is a mean over them)."""
    v = batch.velocity
    return torch.full((), v.numel(), dtype=torch.int64, device=v.device)
