"""Pipeline parallelism on `torch.distributed.pipelining`: layer split, stage modules, schedule.

- Split (pipeline_split.py): the layers are cut into pp * virtual_stages contiguous stages, evenly
  or balanced under the spec's per-layer costs (first and last stage's extra work counted too).
- Placement: chunk c of pipeline rank r is stage c*pp + r ("loop"), or for V schedules rank r holds
  stages r and 2*pp-1-r.
- Stage modules come from the spec: copies of the model that keep only their layers (names
  unchanged, so checkpoints are layout-independent), the input layers on stage 0 and the head on
  the last. The spec's keyword fields (e.g. position and document ids) go to every stage,
  microbatched by the schedule along the batch dimension like the input.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.pipelining.schedules import PipelineScheduleMulti

from meshweave.core.comm import CommLedger
from meshweave.core.mesh import Mesh
from meshweave.models.spec import ModelSpec
from meshweave.parallel.pipeline_comm import CountedPipelineStage
from meshweave.parallel.schedules import schedule_class, stage_ids_of_rank, stage_style

def split_model(spec: ModelSpec, model: nn.Module, pp_rank: int, pp: int, virtual: int, schedule: str,
                stage_layers: list[list[int]]) -> tuple[list[int], list[nn.Module]]:
    """This pipeline rank's stage indices and their stage modules."""
    n_stages = pp * virtual
    ids = stage_ids_of_rank(pp_rank, pp, virtual, stage_style(schedule))
    return ids, [spec.pipeline_stage(model, stage_layers[s], s == 0, s == n_stages - 1) for s in ids]


def build_schedule(modules: list[nn.Module], stage_ids: list[int], n_stages: int, schedule: str, microbatches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], pp_group: torch.distributed.ProcessGroup,
                   device: torch.device, ledger: CommLedger | None = None):
    """PipelineStages for this rank's (already parallelised) stage modules and the schedule over them.

    Communicates over `pp_group`: per microbatch, the stage output activations forward and their
    gradients backward between neighbouring stages (recorded in `ledger` under "pp"); on the first
    step also a one-time exchange of shapes. Gradients are not rescaled by the schedule
    (scale_grads=False): `loss_fn` already divides by the global target count.
    """
    stages = [CountedPipelineStage(m, s, n_stages, device, group=pp_group, ledger=ledger, group_name="pp")
              for m, s in zip(modules, stage_ids)]
    cls = schedule_class(schedule)
    if issubclass(cls, PipelineScheduleMulti):
        return stages, cls(stages, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)
    return stages, cls(stages[0], n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)


def apply_pipeline_replicate(module: nn.Module, mesh: Mesh) -> nn.Module:
    """dp_mode "ddp" on a pipeline stage: replicate the stage over dp x sp and all-reduce (average)
    its gradients after the stage's last microbatch backward.

    Uses torch's composable `replicate` (DDP semantics on FSDP2's machinery), which pipelining
    drives like FSDP2. `DistributedDataParallel` itself fails here (torch 2.13, gloo) as soon as a
    step has more than one microbatch: after the first step its reducer holds twice as many
    parameters in its bucket-rebuild order as the stage has ("rebuilt parameter indices size is
    not same as original model parameters size", 19 vs 38) and asserts in the next forward.
    """
    if mesh.dims.dp * mesh.dims.sp == 1:
        return module
    return replicate(module, mesh=mesh.submesh("dp_sp"))
