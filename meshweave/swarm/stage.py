"""One pipeline stage as a SWARM peer holds it: the module, its optimizer, and the data every peer derives.

Every peer builds the full model from the run's seed (so all peers start from the same weights) and
keeps only its stage's layers; every peer also rebuilds each step's global batch from the data
sampler itself, so only activations and gradients ever cross the network.
"""

from __future__ import annotations

import torch
from torch import nn

from meshweave.core.batch import Batch
from meshweave.core.schema import Config
from meshweave.data.text import DistributedSampler, build_dataset
from meshweave.models.registry import model_spec
from meshweave.models.spec import ModelSpec
from meshweave.parallel.pipeline_split import split_even
from meshweave.train.optim import build_optimizer, lr_factor

TRANSFER_TAG = 1 << 20  # state transfers use tags above every step's microbatch tags


class StepData:
    """The global batch of each step, and its microbatches, from the run's seed (the same on every peer)."""

    def __init__(self, cfg: Config, microbatches: int) -> None:
        t, d = cfg.train, cfg.data
        self.dataset = build_dataset(d.source, d.path, d.max_bytes, t.seq_len, cfg.model.vocab_size, t.seed,
                                     d.synthetic_mean_len, d.synthetic_max_len, d.document_masking)
        self.sampler = DistributedSampler(len(self.dataset), t.global_batch, 0, 1, t.seed)
        self.microbatches, self.per_microbatch = microbatches, t.global_batch // microbatches
        self.step, self.rows, self.batch = 0, [], None

    def at(self, step: int) -> Batch:
        """The global batch of `step` (0-based); steps are visited in order, or replayed from the start."""
        if step < self.step or self.batch is None:
            self.sampler.epoch, self.sampler.position, self.step = 0, 0, 0
            self.rows, self.batch = self.sampler.next_global_rows(), None
        while self.step < step:
            self.rows, self.step = self.sampler.next_global_rows(), self.step + 1
        if self.batch is None or self.batch_step != step:
            self.batch, self.batch_step = self.dataset.batch(self.rows), step
        return self.batch

    def microbatch_rows(self, step: int, m: int) -> list[int]:
        self.at(step)
        return self.rows[m * self.per_microbatch:(m + 1) * self.per_microbatch]

    def microbatch(self, batch: Batch, m: int) -> Batch:
        return batch.slice(m * self.per_microbatch, (m + 1) * self.per_microbatch)


class StageModel:
    """Stage `stage`'s layers of the model, with their AdamW (same groups and hyper-parameters as `train`)."""

    def __init__(self, cfg: Config, stage: int, device: torch.device) -> None:
        self.cfg, self.stage, self.device = cfg, stage, device
        self.spec: ModelSpec = model_spec(cfg.model.kind)
        n_stages = cfg.fault_tolerance.stages
        layers = split_even(self.spec.num_layers(cfg.model), n_stages)[stage]
        torch.manual_seed(cfg.train.seed)
        with torch.device(device):
            full = self.spec.build(cfg.model)
        self.first, self.last = stage == 0, stage == n_stages - 1
        self.module: nn.Module = self.spec.pipeline_stage(full, layers, self.first, self.last)
        del full
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = build_optimizer([self.module], cfg.train, device.type)

    def kwargs(self, mb: Batch) -> dict[str, torch.Tensor]:
        return {f: mb.fields[f] for f in self.spec.kwarg_fields if f in mb.fields}

    def activation_shape(self, mb: Batch) -> tuple[int, ...]:
        tokens = mb.fields[self.spec.input_field]
        return (*tokens.shape, self.spec.hidden_width(self.cfg.model))

    def flat_grads(self) -> torch.Tensor:
        """All gradients in one float32 buffer (zeros where a parameter saw no microbatch)."""
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in self.params])

    def set_grads(self, flat: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype).clone()
            offset += n

    def apply(self, step: int, total_norm: float) -> None:
        """The optimizer step of committed step `step` with the whole model's gradient norm."""
        t = self.cfg.train
        if t.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, t.grad_clip, torch.tensor(total_norm, dtype=torch.float32),
                                                 foreach=True)
        for group in self.optimizer.param_groups:
            group["lr"] = t.lr * lr_factor(step, t)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_tensors(self, with_optimizer: bool) -> list[torch.Tensor]:
        """What a joining peer receives, in a fixed order: parameters, then AdamW's step/exp_avg/exp_avg_sq."""
        tensors = [p.data for p in self.params]
        if with_optimizer:
            for p in self.params:
                state = self.optimizer.state[p]
                tensors += [state["step"].reshape(1), state["exp_avg"], state["exp_avg_sq"]]
        return tensors

    def materialise_optimizer_state(self) -> None:
        """Create AdamW's state tensors (to be overwritten by a donor's) with one zero-gradient step."""
        for p in self.params:
            p.grad = torch.zeros_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
