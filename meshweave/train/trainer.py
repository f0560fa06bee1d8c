"""The training loop: one optimizer step at a time, layout-agnostic.

Loss normalisation: every rank divides its summed loss by the number of targets in the whole
global batch (all-reduced over the data-parallel axis; `global_target_count` is the one definition),
and gradients are summed over dp x sp. Any layout therefore computes exactly the gradient one
process would on the same batch.

Host syncs: the batch goes to the device once, and the target count, the loss and the gradient norm
stay there; they reach the host only when the metrics logger formats a log step (and once at the end
for the list of losses `train()` returns).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn

from meshweave.core.batch import Batch
from meshweave.core.mesh import Mesh
from meshweave.core.schema import Config
from meshweave.data.text import DistributedSampler, PackedDataset
from meshweave.models.spec import ModelSpec
from meshweave.parallel.runner import StepRunner
from meshweave.train.faults import maybe_inject_fault
from meshweave.train.metrics import MetricsLogger, StepMetrics
from meshweave.train.optim import clip_grad_norm


class CheckpointHooks(Protocol):
    def load_latest(self, app_state: dict[str, Any]) -> int | None: ...
    def before_optimizer_step(self) -> None: ...
    def after_optimizer_step(self, step: int, app_state: dict[str, Any], final_step: bool = False) -> None: ...
    def close(self) -> None: ...


@dataclass
class TrainingParts:
    cfg: Config
    spec: ModelSpec
    mesh: Mesh
    device: torch.device
    runner: StepRunner
    model_parts: list[nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dataset: PackedDataset
    sampler: DistributedSampler
    metrics: MetricsLogger
    checkpointer: CheckpointHooks | None = None
    app_state: dict[str, Any] = field(default_factory=dict)


class Trainer:
    def __init__(self, parts: TrainingParts) -> None:
        self.p = parts
        self.step = 0
        self.losses: list[torch.Tensor] = []  # per step, on the device

    # --- state that is not model/optimizer/data (checkpointed as "trainer") ----------------
    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "scheduler": self.p.scheduler.state_dict(), "rng_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["rng_cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.p.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng_cuda"])

    # --- loop -----------------------------------------------------------------------------
    def train(self) -> list[float]:
        """Resume if a checkpoint exists, run to train.steps, return the losses of the steps run."""
        ckpt, first = self.p.checkpointer, self.step
        if ckpt is not None and self.p.cfg.checkpoint.resume:
            resumed = ckpt.load_latest(self.p.app_state)
            if resumed is not None:
                first = self.step
                where = getattr(ckpt, "resumed_from", None)  # the level and directory, where the hooks say it
                self._say(f"resumed from checkpoint at step {resumed}" + (f" ({where})" if where else ""))
        try:
            while self.step < self.p.cfg.train.steps:
                self.p.metrics.log(self.train_step(), first_step=first)
        finally:
            if ckpt is not None:
                ckpt.close()
            self.p.metrics.close()
        return torch.stack(self.losses).tolist() if self.losses else []

    def train_step(self) -> StepMetrics:
        """One optimizer step on the next global batch; its metrics stay on the device."""
        start = time.perf_counter()
        p = self.p
        batch = p.dataset.batch(p.sampler.next_local_rows()).to(p.device)
        global_targets = self.global_target_count(batch)
        loss = self._global_loss_sum(p.runner.forward_backward(batch, global_targets)) / global_targets
        grad_norm = clip_grad_norm(p.model_parts, p.cfg.train.grad_clip, p.mesh.group("pp"))
        if p.checkpointer is not None:
            p.checkpointer.before_optimizer_step()
        lr = p.optimizer.param_groups[0]["lr"]
        p.optimizer.step()
        p.scheduler.step()
        p.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(loss)
        if p.checkpointer is not None:
            p.checkpointer.after_optimizer_step(self.step, p.app_state, final_step=self.step == p.cfg.train.steps)
        maybe_inject_fault(self.step, p.metrics.rank)
        tokens = self._tokens_per_step(batch)
        return StepMetrics(self.step, loss, grad_norm, lr, tokens, time.perf_counter() - start)

    def _tokens_per_step(self, batch: Batch) -> int:
        p = self.p
        if getattr(p.runner, "batch_is_global", False):
            return batch.fields[p.spec.input_field].numel()  # whole documents: the step's size varies
        per_sample = p.spec.tokens_per_sample(p.cfg.model) if p.spec.tokens_per_sample else p.cfg.train.seq_len
        return p.cfg.train.global_batch * per_sample

    def global_target_count(self, batch: Batch) -> torch.Tensor:
        """Targets in the whole global batch (fp64 device tensor): what every rank divides its loss sum by.

        Communicates: one all-reduce of one value over the dp group (dp replicas hold different rows;
        sp/tp/pp peers hold the same rows); nothing when the runner reads the whole global batch on every rank."""
        local = self.p.spec.count_targets(batch).to(torch.float64).reshape(1)
        if getattr(self.p.runner, "batch_is_global", False):
            return local[0]  # every rank holds the whole global batch (sp: adaptive)
        return self.p.mesh.group("dp").all_reduce(local)[0]

    def _global_loss_sum(self, local_loss: torch.Tensor) -> torch.Tensor:
        """Sum of losses over the global batch: over dp x sp, and over pp (only the last stage has it)."""
        total = self.p.mesh.group("dp_sp").all_reduce(local_loss.double().reshape(1).clone())
        return self.p.mesh.group("pp").all_reduce(total)[0]

    def _say(self, message: str) -> None:
        if self.p.metrics.rank == 0:
            print(f"meshweave: {message}", flush=True)
