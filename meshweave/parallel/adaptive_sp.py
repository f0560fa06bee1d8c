"""Adaptive sequence parallelism at run time (`parallel.sp: adaptive`, FlexSP): the step runner.

Every rank reads the step's whole global batch of sequences (data/documents.py). Rank 0 plans the step
(parallel/adaptive/: which aligned power-of-two group of ranks computes which sequences, in how many
micro-batches) and broadcasts the plan; every rank then runs each micro-batch with the attention op of its
group that micro-batch, on its shard of the group's sequences packed into one row with per-document masks.

- Groups: every power-of-two block of the data-parallel ranks, created once at start-up (`carve_subgroups`);
  a rank belongs to one group of each size, and a plan only ever uses aligned blocks, so the group a plan
  names is always the one this rank already holds.
- Model states are sharded over all ranks (FSDP2 over dp), so any regrouping is legal: every rank runs
  every micro-batch's forward and backward (the plan leaves no rank idle), and the gradients are reduced
  once, after the last micro-batch.
- Loss: each rank's summed loss is scaled by world / (targets in the whole global batch), the same
  token-weighted normalisation as every other layout, so the gradient is the global batch's on one process.

Communicates per step: two broadcasts of the plan (its length, then a few hundred int64) over the world group, then what the
SP method moves inside each group and FSDP2's collectives. Host syncs per step: the sequence lengths (to
plan) — the planner runs on the host by nature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from meshweave.attention import SequenceParallelAttention
from meshweave.attention.lasp2 import lasp2_for_layout
from meshweave.attention.validate import max_ulysses_degree
from meshweave.core.batch import IGNORE_INDEX, Batch
from meshweave.core.comm import CommGroup
from meshweave.core.schema import Config
from meshweave.models.attention_api import AttentionOp, AttentionSlot
from meshweave.models.registry import model_spec
from meshweave.models.spec import slot_kinds
from meshweave.parallel.adaptive import CostModel, StepPlan, plan_step
from meshweave.parallel.runner import ModelIO, autocast_context, gradient_sync, scaled_for_backward


@dataclass(frozen=True)
class PlannerSettings:
    """What `plan_step` needs besides the lengths (from `parallel.adaptive` and the model's head count)."""

    n_ranks: int
    capacity_tokens: int
    max_group: int
    strategy: str  # "milp" | "greedy" | "megatron" | "static-<s>"
    time_limit_s: float
    mip_gap: float

    @classmethod
    def from_config(cls, cfg: Config, n_ranks: int) -> PlannerSettings:
        a = cfg.parallel.adaptive
        strategy = a.strategy if a.strategy != "static" else f"static-{a.static_size}"
        return cls(n_ranks, a.tokens_per_rank or cfg.data.max_len, adaptive_max_group(cfg, n_ranks), strategy,
                   a.time_limit_ms / 1000, a.mip_gap)

    def plan(self, lengths: list[int], cost: CostModel) -> StepPlan:
        return plan_step(lengths, self.n_ranks, cost, self.capacity_tokens, max_group=self.max_group,
                         strategy=self.strategy, time_limit_s=self.time_limit_s, mip_gap=self.mip_gap)


def adaptive_max_group(cfg: Config, n_ranks: int) -> int:
    """The largest group size: a power of two up to the ranks, and (Ulysses) one whose head split the model allows."""
    largest = 1 << (n_ranks.bit_length() - 1)
    if cfg.parallel.sp_method != "ulysses" or "softmax" not in slot_kinds(model_spec(cfg.model.kind), cfg.model):
        return largest
    m = cfg.model
    return max_ulysses_degree(m.n_heads, getattr(m, "n_kv_heads", None) or m.n_heads, largest)


def group_ops(method: str, group: CommGroup, slot_kinds: set[str]) -> dict[str, AttentionOp]:
    """The op of each attention-slot kind over one group: the SP method for softmax slots (local on one rank),
    LASP-2 in the same layout for linear slots."""
    layout = SequenceParallelAttention("local" if group.size == 1 else method, group)
    ops: dict[str, AttentionOp] = {"softmax": layout}
    if "linear" in slot_kinds:
        ops["linear"] = lasp2_for_layout(group, layout)
    unknown = slot_kinds - set(ops)
    if unknown:
        raise ValueError(f"sp: adaptive has no op for attention slot kind(s) {sorted(unknown)}")
    return {kind: ops[kind] for kind in slot_kinds}


def sequence_rows(batch: Batch, lengths: list[int], sequences: tuple[int, ...], multiple: int) -> Batch:
    """The chosen sequences of a step's packed row as one row, renumbered 0..k-1 and padded (a document of
    its own, no targets) to a multiple of `multiple` tokens, which the SP layouts need."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    index = torch.cat([torch.arange(offsets[i], offsets[i] + lengths[i]) for i in sequences])
    doc_ids = torch.cat([torch.full((lengths[i],), k) for k, i in enumerate(sequences)])
    pad = -len(index) % multiple
    device = batch.tokens.device
    fields = {name: t.index_select(1, index.to(device)) for name, t in batch.fields.items()}
    fields["document_ids"] = doc_ids.to(device).unsqueeze(0)
    if pad:
        fill = {"labels": IGNORE_INDEX, "document_ids": len(sequences)}
        fields = {name: torch.cat([t, torch.full((1, pad), fill.get(name, 0), dtype=t.dtype, device=device)], dim=1)
                  for name, t in fields.items()}
        fields["position_ids"][0, -pad:] = torch.arange(pad, device=device)
    return Batch(fields, batch.seq_dims)


def sequence_lengths(batch: Batch) -> list[int]:
    """Lengths of the step's sequences from the packed row's document ids (0..k-1 in order): one host read."""
    return torch.bincount(batch.document_ids[0]).tolist()


class AdaptivePlanError(ValueError):
    """No plan for this step (e.g. too few sequences to keep every rank busy); the message names the fix."""


def broadcast_plan(plan: StepPlan | Exception | None, world: CommGroup, device: torch.device) -> StepPlan:
    """Rank 0's plan on every rank: two broadcasts, the length of its integer encoding (-1: no plan) and then
    the encoding itself (a few hundred int64). When rank 0 could not plan, every rank raises instead of
    waiting: rank 0 with the planner's message."""
    code = plan.encode() if world.rank == 0 and not isinstance(plan, Exception) else []
    header = torch.tensor([-1 if isinstance(plan, Exception) else len(code)], dtype=torch.int64, device=device)
    length = int(world.broadcast(header, src=0)[0])
    if length < 0:
        if isinstance(plan, Exception):
            raise AdaptivePlanError(str(plan)) from plan
        raise AdaptivePlanError("rank 0 could not plan this step (its log names the reason)")
    payload = torch.tensor(code, dtype=torch.int64, device=device) if world.rank == 0 else \
        torch.empty(length, dtype=torch.int64, device=device)
    return StepPlan.decode(world.broadcast(payload, src=0).cpu().tolist())


class AdaptiveRunner:
    """Runs one step's global batch of whole sequences as the plan says (see the module docstring)."""

    batch_is_global = True  # the trainer counts targets without reducing over ranks: every rank has them all

    def __init__(self, model: nn.Module, unwrapped: nn.Module, io: ModelIO, slots: list[AttentionSlot],
                 ops_by_size: dict[int, dict[str, AttentionOp]], world: CommGroup, settings: PlannerSettings,
                 cost: CostModel, autocast_dtype: torch.dtype | None) -> None:
        self.model, self.io, self.slots, self.ops_by_size = model, io, slots, ops_by_size
        self.model_parts = [unwrapped]
        self.world, self.settings, self.cost, self.autocast_dtype = world, settings, cost, autocast_dtype
        self.device = next(unwrapped.parameters()).device
        self.last_plan: StepPlan | None = None

    def forward_backward(self, batch: Batch, global_targets: torch.Tensor) -> torch.Tensor:
        lengths = sequence_lengths(batch)
        plan = self.last_plan = broadcast_plan(self._plan_on_rank0(lengths), self.world, self.device)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(len(plan.microbatches)):
            group = plan.group_of(i, self.world.rank)
            ops = self._switch_ops(group.size)
            rows = sequence_rows(batch, lengths, group.sequences, multiple=2 * group.size)
            micro = rows.map_sequence(lambda t, dim, layout=ops["softmax"]: layout.shard(t, dim=dim))
            with gradient_sync(self.model, enabled=i == len(plan.microbatches) - 1):
                total += self._forward_backward(micro, global_targets)
        return total

    def _plan_on_rank0(self, lengths: list[int]) -> StepPlan | Exception | None:
        if self.world.rank != 0:
            return None
        try:
            return self.settings.plan(lengths, self.cost)
        except ValueError as err:  # the planner's one-line reasons (a sequence too long, too few to fill the ranks)
            return err

    def calibration_step(self, row: Batch) -> None:
        """Forward+backward of one row on this rank alone (the one-rank op), for timing the cost model; gradients
        are reduced as in a real step (so nothing stays in FSDP2's unsharded buffers) and dropped by the caller."""
        self._switch_ops(1)
        targets = (row.fields[self.io.target_field] != IGNORE_INDEX).sum().to(torch.float64)
        with gradient_sync(self.model, enabled=True):
            self._forward_backward(row, targets)

    def _switch_ops(self, size: int) -> dict[str, AttentionOp]:
        """Point every attention slot at its op over this rank's group of `size` (the ops capture their group
        for backward, so switching between micro-batches is safe)."""
        ops = self.ops_by_size[size]
        for slot in self.slots:
            slot.op = ops[slot.kind]
        return ops

    def _forward_backward(self, micro: Batch, global_targets: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.device, self.autocast_dtype):
            output = self.model(micro.fields[self.io.input_field], **self.io.kwargs(micro))
        loss_sum = self.io.loss_sum(output, micro.fields[self.io.target_field])
        del output
        scaled_for_backward(loss_sum, self.world.size, global_targets).backward()
        return loss_sum.detach().double()


__all__ = ["AdaptivePlanError", "AdaptiveRunner", "PlannerSettings", "adaptive_max_group", "broadcast_plan", "group_ops",
           "sequence_lengths", "sequence_rows"]
