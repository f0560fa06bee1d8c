"""Apply the parallelisms to a model in one fixed order, each step a small function:

    pipeline split -> tensor parallel per stage -> sequence-parallel ops in the attention slots
    -> activation checkpointing -> FSDP2 / DDP

and return the step runner that executes the result. Everything model-specific comes from the
model's spec (models/spec.py); nothing here names a model attribute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint

from meshweave.core.mesh import Mesh
from meshweave.core.schema import Config
from meshweave.models.attention_api import attention_slots
from meshweave.models.spec import ModelSpec
from meshweave.parallel.adaptive_calibrate import resolve_cost_model
from meshweave.parallel.adaptive_sp import AdaptiveRunner, PlannerSettings, group_ops
from meshweave.parallel.data_parallel import apply_ddp, apply_fsdp
from meshweave.parallel.pipeline import apply_pipeline_replicate, build_schedule, split_model
from meshweave.parallel.pipeline_runner import PipelineRunner, TokenWeightedLoss
from meshweave.parallel.pipeline_split import split_layers
from meshweave.parallel.runner import LocalRunner, ModelIO, StepRunner
from meshweave.parallel.schedules import is_multi_stage
from meshweave.parallel.sequence import apply_sequence_parallel
from meshweave.parallel.tensor_parallel import apply_tensor_parallel
from meshweave.parallel.tensor_parallel_comm import CountedTensorParallel


@dataclass
class ParallelModel:
    runner: StepRunner
    model_parts: list[nn.Module]  # unwrapped modules (for state dicts and the optimizer)


def parallelize(model: nn.Module, spec: ModelSpec, mesh: Mesh, cfg: Config, compute_dtype: torch.dtype) -> ParallelModel:
    """Shard `model` (built whole on this rank) over `mesh` as `cfg.parallel` says; return its runner."""
    p = cfg.parallel
    if p.adaptive.enabled:
        return parallelize_adaptive(model, spec, mesh, cfg, compute_dtype)
    stage_ids, parts = split_pipeline(model, spec, mesh, cfg) if p.pp > 1 else ([0], [model])
    for part in parts:
        apply_tensor_parallel_step(part, spec, mesh)
    shard = None
    if p.sp > 1:
        for part in parts:
            shard = apply_sequence_parallel(part, mesh, p)
    if p.activation_checkpointing:
        for part in parts:
            apply_activation_checkpointing(spec.blocks(part))
    wrapped = [apply_data_parallel(part, spec, mesh, cfg, compute_dtype) if p.pp == 1 or p.dp_mode == "fsdp"
               else apply_pipeline_replicate(part, mesh) for part in parts]
    autocast = autocast_dtype(wrapped, compute_dtype)
    io = ModelIO.of(spec, loss_parallel=p.tp > 1 and spec.loss_parallel)
    scale = mesh.dims.dp * mesh.dims.sp
    if p.pp > 1:
        return ParallelModel(pipeline_runner(wrapped, parts, stage_ids, mesh, cfg, io, shard, autocast, scale), parts)
    runner = LocalRunner(wrapped[0], io, cfg.train.grad_accum, shard=shard, autocast_dtype=autocast,
                         gradient_average_scale=scale, traffic=tensor_parallel_traffic(mesh))
    runner.model_parts = [model]
    return ParallelModel(runner, [model])


def parallelize_adaptive(model: nn.Module, spec: ModelSpec, mesh: Mesh, cfg: Config,
                         compute_dtype: torch.dtype) -> ParallelModel:
    """`sp: adaptive`: an op per power-of-two group of the dp ranks (created once), FSDP2 over all ranks, and the
    runner that plans each step (parallel/adaptive_sp.py); the planner's cost model is calibrated here."""
    world, settings = mesh.group("world"), PlannerSettings.from_config(cfg, mesh.dims.dp)
    slots = attention_slots(model)
    groups = mesh.carve_subgroups(("dp",), [1 << i for i in range(settings.max_group.bit_length())])
    ops_by_size = {size: group_ops(cfg.parallel.sp_method, group, {s.kind for s in slots}) for size, group in groups.items()}
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(spec.blocks(model))
    wrapped = apply_data_parallel(model, spec, mesh, cfg, compute_dtype)
    runner = AdaptiveRunner(wrapped, model, ModelIO.of(spec), slots, ops_by_size, world, settings, None,
                            autocast_dtype([wrapped], compute_dtype))
    element_bytes = torch.finfo(compute_dtype).bits // 8
    runner.cost = resolve_cost_model(cfg, runner.calibration_step, model, groups, world, runner.device, element_bytes)
    return ParallelModel(runner, [model])


def autocast_dtype(wrapped: list[nn.Module], compute_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the forward runs under autocast in, or None (fp32, or every part under FSDP2).

    FSDP2's MixedPrecisionPolicy already casts the parameters to the compute dtype; anything not under it
    (DDP, pipeline stages replicated without FSDP, and a single rank, where nothing is wrapped at all)
    needs autocast, or a bf16 `train.dtype` would silently train in fp32.
    """
    if compute_dtype == torch.float32 or all(isinstance(m, FSDPModule) for m in wrapped):
        return None
    return compute_dtype


def split_pipeline(model: nn.Module, spec: ModelSpec, mesh: Mesh, cfg: Config) -> tuple[list[int], list[nn.Module]]:
    """This rank's pipeline stage indices and stage modules (layers split evenly or by cost)."""
    p = cfg.parallel
    virtual = p.virtual_stages if is_multi_stage(p.pp_schedule) else 1
    layers = split_layers(spec, cfg.model, cfg.train.seq_len, mesh.dims.pp * virtual, p.pp_split)
    return split_model(spec, model, mesh.coordinate["pp"], mesh.dims.pp, virtual, p.pp_schedule, layers)


def apply_tensor_parallel_step(model: nn.Module, spec: ModelSpec, mesh: Mesh) -> None:
    """Shard the model (or one pipeline stage) over the tp axis with the spec's plan; nothing when tp == 1."""
    if mesh.dims.tp > 1:
        apply_tensor_parallel(model, mesh.submesh("tp"), spec.tp_plan(model))


def tensor_parallel_traffic(mesh: Mesh) -> Callable[[], CountedTensorParallel] | None:
    """Factory of the context that records DTensor's tensor-parallel collectives in the ledger; None when
    tp == 1 or accounting is off (the counter is a Python dispatch mode: it must not sit in the hot path)."""
    if mesh.dims.tp == 1 or not mesh.ledger.enabled:
        return None
    tp_ranks = mesh.group("tp").ranks
    return lambda: CountedTensorParallel(mesh.ledger, tp_ranks)


def pipeline_runner(wrapped: list[nn.Module], parts: list[nn.Module], stage_ids: list[int], mesh: Mesh, cfg: Config,
                    io: ModelIO, shard, autocast: torch.dtype | None, scale: int) -> PipelineRunner:
    """Build the stages and the schedule over the (parallelised) stage modules and return their runner."""
    p = cfg.parallel
    loss = TokenWeightedLoss(io.loss_sum, scale)
    n_stages = mesh.dims.pp * len(stage_ids)
    device = next(parts[0].parameters()).device
    stages, schedule = build_schedule(wrapped, stage_ids, n_stages, p.pp_schedule, p.microbatches, loss,
                                      mesh.group("pp").pg, device, mesh.ledger if mesh.ledger.enabled else None)
    return PipelineRunner(schedule, stages, parts, loss, io, p.microbatches, shard=shard, autocast_dtype=autocast,
                          traffic=tensor_parallel_traffic(mesh))


def apply_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Recompute each block in backward instead of keeping its activations.

    The block's forward is wrapped in place (not the module), so parameter names — and hence
    checkpoints — are the same with and without activation checkpointing.
    """
    for block in blocks:
        inner = block.forward
        block.forward = lambda *args, _f=inner, **kwargs: checkpoint(_f, *args, use_reentrant=False, **kwargs)


def apply_data_parallel(model: nn.Module, spec: ModelSpec, mesh: Mesh, cfg: Config, compute_dtype: torch.dtype) -> nn.Module:
    """FSDP2 or DDP over dp x sp; nothing when that span is a single rank."""
    if mesh.dims.dp * mesh.dims.sp == 1:
        return model
    ledger = mesh.ledger if mesh.ledger.enabled else None
    if cfg.parallel.dp_mode == "fsdp":
        return apply_fsdp(model, spec.fsdp_units(model), mesh.submesh("dp_sp"), compute_dtype,
                          reshard_after_forward=cfg.parallel.pp == 1, ledger=ledger, group_name="dp_sp:fsdp")
    return apply_ddp(model, mesh.submesh("dp_sp"), ledger=ledger, group_name="dp_sp:ddp")
