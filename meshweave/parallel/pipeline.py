"""Pipeline parallelism on `torch.distributed.pipelining`: layer split, stage modules, schedule.

- Split: the layers are cut into pp * virtual_stages contiguous stages, either evenly or so that
  the most expensive stage is as cheap as possible under a per-layer cost estimate in which the
  embedding (first stage) and the norm + output head + loss (last stage) are counted too.
- Placement: chunk c of pipeline rank r is stage c*pp + r ("loop"), or for V schedules rank r holds
  stages r and 2*pp-1-r.
- Stage modules are copies of the model that keep only their layers (names unchanged, so state
  dicts and checkpoints are layout-independent); the embedding lives on stage 0, norm and head on
  the last stage. Position ids and document ids are passed to every stage as keyword arguments,
  microbatched by the schedule along the batch dimension like the tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.pipelining.schedules import PipelineScheduleMulti

from meshweave.comm import CommLedger
from meshweave.models.flops import block_params
from meshweave.models.llama import ModelConfig
from meshweave.parallel.pipeline_comm import CountedPipelineStage
from meshweave.runtime.mesh import Mesh
from meshweave.parallel.schedules import schedule_class, stage_ids_of_rank, stage_style


def layer_costs(cfg: ModelConfig, seq_len: int) -> tuple[list[float], float, float]:
    """Per-token forward FLOPs of each block, of the embedding and of norm + head + loss.

    Blocks: 2 FLOPs per matmul parameter plus causal attention (2 * seq * head_dim * heads).
    Embedding: a lookup, counted as the dim values it moves (it does no matmul).
    Head: 2 * dim * vocab for the projection plus ~5 * vocab for softmax and cross-entropy.
    """
    block = 2 * (block_params(cfg) - 2 * cfg.dim) + 2 * seq_len * cfg.head_dim * cfg.n_heads
    return [float(block)] * cfg.n_layers, float(cfg.dim), float(2 * cfg.dim * cfg.vocab_size + 5 * cfg.vocab_size)


def split_even(n_layers: int, n_stages: int) -> list[list[int]]:
    """Layers of each stage, n_layers / n_stages consecutive layers each (must divide)."""
    if n_layers % n_stages:
        raise ValueError(f"{n_layers} layers do not split evenly into {n_stages} stages")
    per = n_layers // n_stages
    return [list(range(s * per, (s + 1) * per)) for s in range(n_stages)]


def split_by_cost(costs: list[float], n_stages: int, first_extra: float = 0.0, last_extra: float = 0.0) -> list[list[int]]:
    """Contiguous split of the layers into n_stages (>= 1 layer each) minimising the largest stage
    cost, where stage 0 also pays `first_extra` (embedding) and the last stage `last_extra` (head).
    Exact dynamic programme over cut points, O(stages * layers^2)."""
    n = len(costs)
    if n < n_stages:
        raise ValueError(f"{n} layers cannot fill {n_stages} stages with at least one layer each")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, lo: int, hi: int) -> float:
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == n_stages - 1 else 0.0)
        return prefix[hi] - prefix[lo] + extra

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]  # best[s][i]: first i layers in s stages
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        for i in range(s, n - (n_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], cost(s - 1, j, i))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds, i = [], n
    for s in range(n_stages, 0, -1):
        bounds.append((cut[s][i], i))
        i = cut[s][i]
    return [list(range(lo, hi)) for lo, hi in reversed(bounds)]


def split_layers(cfg: ModelConfig, seq_len: int, n_stages: int, method: str) -> list[list[int]]:
    """Layers of every stage for the config's `pp_split` method ("even" or "cost")."""
    if method == "even":
        return split_even(cfg.n_layers, n_stages)
    costs, embedding, head = layer_costs(cfg, seq_len)
    return split_by_cost(costs, n_stages, embedding, head)


def stage_module(model: nn.Module, layers: list[int], is_first: bool, is_last: bool) -> nn.Module:
    """A copy of `model` holding only `layers` (plus the embedding on the first stage and norm +
    head on the last); parameter names are those of the full model."""
    part = copy.deepcopy(model)
    keep = {str(i) for i in layers}
    for name in [n for n in part.layers if n not in keep]:
        del part.layers[name]
    if not is_first:
        part.tok_embeddings = None
    if not is_last:
        part.norm, part.output = None, None
    return part


def split_model(model: nn.Module, pp_rank: int, pp: int, virtual: int, schedule: str,
                stage_layers: list[list[int]]) -> tuple[list[int], list[nn.Module]]:
    """This pipeline rank's stage indices and their stage modules."""
    n_stages = pp * virtual
    ids = stage_ids_of_rank(pp_rank, pp, virtual, stage_style(schedule))
    return ids, [stage_module(model, stage_layers[s], s == 0, s == n_stages - 1) for s in ids]


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
