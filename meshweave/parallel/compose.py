"""Apply the parallelisms to a model in one fixed order, each step a small function:

    pipeline split -> tensor parallel per stage -> sequence-parallel attention
    -> activation checkpointing -> FSDP2 / DDP

and return the step runner that executes the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from meshweave.parallel.data_parallel import apply_ddp, apply_fsdp
from meshweave.parallel.runner import LocalRunner, StepRunner
from meshweave.parallel.sequence import apply_sequence_parallel
from meshweave.runtime.mesh import Mesh
from meshweave.runtime.schema import Config


@dataclass
class ParallelModel:
    runner: StepRunner
    model_parts: list[nn.Module]  # unwrapped modules (for state dicts and the optimizer)


def parallelize(model: nn.Module, mesh: Mesh, cfg: Config, compute_dtype: torch.dtype) -> ParallelModel:
    p = cfg.parallel
    if p.pp > 1:
        raise NotImplementedError("parallel.pp > 1 is not available yet")
    if p.tp > 1:
        raise NotImplementedError("parallel.tp > 1 is not available yet")
    shard = None
    if p.sp > 1:
        shard = apply_sequence_parallel(model, mesh, p)
    if p.activation_checkpointing:
        apply_activation_checkpointing(model)
    wrapped = apply_data_parallel(model, mesh, cfg, compute_dtype)
    autocast = compute_dtype if compute_dtype != torch.float32 and p.dp_mode == "ddp" else None
    runner = LocalRunner(wrapped, cfg.train.grad_accum, shard=shard, autocast_dtype=autocast,
                         document_masking=cfg.data.document_masking,
                         gradient_average_scale=mesh.dims.dp * mesh.dims.sp)
    runner.model_parts = [model]
    return ParallelModel(runner, [model])


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in backward instead of keeping its activations.

    The block's forward is wrapped in place (not the module), so parameter names — and hence
    checkpoints — are the same with and without activation checkpointing.
    """
    for block in model.layers.values():
        inner = block.forward
        block.forward = lambda *args, _f=inner: checkpoint(_f, *args, use_reentrant=False)


def apply_data_parallel(model: nn.Module, mesh: Mesh, cfg: Config, compute_dtype: torch.dtype) -> nn.Module:
    """FSDP2 or DDP over dp x sp; nothing when that span is a single rank."""
    if mesh.dims.dp * mesh.dims.sp == 1:
        return model
    if cfg.parallel.dp_mode == "fsdp":
        return apply_fsdp(model, mesh.submesh("dp_sp"), compute_dtype, reshard_after_forward=cfg.parallel.pp == 1,
                          ledger=mesh.ledger, group_name="dp_sp:fsdp")
    return apply_ddp(model, mesh.submesh("dp_sp"), ledger=mesh.ledger, group_name="dp_sp:ddp")
