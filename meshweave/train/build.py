"""Build everything a rank needs to train, in named phases (each a short function), from a Config.

Needs the default process group to exist (see launch/worker.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from meshweave.core.comm import CommLedger
from meshweave.core.dims import ParallelDims
from meshweave.core.mesh import build_mesh, device_type_for
from meshweave.core.schema import Config
from meshweave.data.documents import TokenBudgetSampler, build_document_dataset
from meshweave.data.text import DistributedSampler, build_dataset
from meshweave.models.registry import model_spec
from meshweave.models.spec import ModelSpec
from meshweave.parallel.compose import parallelize
from meshweave.train.config import dump_yaml
from meshweave.train.metrics import MetricsLogger, peak_tflops
from meshweave.train.optim import build_optimizer, build_scheduler
from meshweave.train.trainer import Trainer, TrainingParts
from meshweave.train.validate import resolve_defaults


def compute_dtype(cfg: Config, device_type: str) -> torch.dtype:
    """bf16 compute on GPU by default (fp32 master weights and reductions), fp32 on CPU."""
    if cfg.train.dtype == "auto":
        return torch.bfloat16 if device_type == "cuda" else torch.float32
    return getattr(torch, cfg.train.dtype)


def parallel_dims(cfg: Config, world_size: int) -> ParallelDims:
    return ParallelDims.resolve(cfg.parallel, world_size)


def build_model(spec: ModelSpec, cfg: Config, device: torch.device) -> nn.Module:
    """Same seed on every rank, so every rank starts from the same full weights before sharding."""
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        return spec.build(cfg.model)


def build_checkpointer(cfg: Config) -> Any:
    if cfg.checkpoint.dir is None:
        return None
    from meshweave.checkpoint import Checkpointer

    group = dist.new_group(backend="gloo")  # background checkpoint collectives never share the training group
    return Checkpointer(cfg.checkpoint, group, dist.get_rank(), dist.get_world_size())


def build_metrics(cfg: Config, spec: ModelSpec, device_type: str) -> MetricsLogger:
    rank, run_dir = dist.get_rank(), Path(cfg.run_dir)
    return MetricsLogger(
        rank=rank, world_size=dist.get_world_size(), total_steps=cfg.train.steps,
        flops_per_token=spec.flops_per_token(cfg.model, cfg.train.seq_len), peak=peak_tflops(cfg.train.peak_tflops, device_type),
        device_type=device_type, every=cfg.logging.every_steps,
        jsonl_path=run_dir / "metrics" / f"rank{rank}.jsonl" if cfg.logging.jsonl else None,
        tb_dir=run_dir / "tensorboard" if cfg.logging.tensorboard else None,
    )


def build_data(cfg: Config, spec: ModelSpec, mesh) -> tuple[Any, Any]:
    """The dataset and its sampler: the spec's own data, whole documents (`data.packing: false`), or packed rows."""
    t, d = cfg.train, cfg.data
    if spec.build_dataset is not None:
        dataset = spec.build_dataset(cfg)
    elif not d.packing:
        dataset = build_document_dataset(d.source, d.path, d.max_bytes, d.max_len, cfg.model.vocab_size, t.seed,
                                         d.synthetic_mean_len, d.synthetic_max_len)
        return dataset, TokenBudgetSampler(dataset.lengths, d.tokens_per_step, t.seed)
    else:
        dataset = build_dataset(d.source, d.path, d.max_bytes, t.seq_len, cfg.model.vocab_size, t.seed,
                                d.synthetic_mean_len, d.synthetic_max_len, d.document_masking)
    return dataset, DistributedSampler(len(dataset), t.global_batch, mesh.coordinate["dp"], mesh.dims.dp, t.seed,
                                       row_tokens=t.seq_len)


def build_trainer(cfg: Config, local_rank: int = 0) -> Trainer:
    """Everything this rank needs to train `cfg`: mesh, data, the parallelised model, optimizer, metrics."""
    cfg = resolve_defaults(cfg, dist.get_world_size())
    device_type = device_type_for(cfg.train.device)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    device = torch.device(device_type, local_rank) if device_type == "cuda" else torch.device("cpu")
    ledger = CommLedger(enabled=cfg.logging.comm_accounting)
    mesh = build_mesh(parallel_dims(cfg, dist.get_world_size()), device_type, ledger)
    if dist.get_rank() == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run_dir) / "config.yaml").write_text(dump_yaml(cfg))
    t, spec = cfg.train, model_spec(cfg.model.kind)
    dataset, sampler = build_data(cfg, spec, mesh)
    pm = parallelize(build_model(spec, cfg, device), spec, mesh, cfg, compute_dtype(cfg, device_type))
    optimizer = build_optimizer(pm.model_parts, t, device_type)
    parts = TrainingParts(cfg, spec, mesh, device, pm.runner, pm.model_parts, optimizer, build_scheduler(optimizer, t),
                          dataset, sampler, build_metrics(cfg, spec, device_type), build_checkpointer(cfg))
    trainer = Trainer(parts)
    parts.app_state = app_state(trainer)
    return trainer


def app_state(trainer: Trainer) -> dict[str, Any]:
    """What a checkpoint holds: model, optimizer, trainer (step, LR schedule, RNG), data position."""
    if trainer.p.checkpointer is None:
        return {}
    from meshweave.checkpoint import ModelState, OptimizerState

    p = trainer.p
    return {"model": ModelState(p.model_parts), "optimizer": OptimizerState(p.model_parts, [p.optimizer]),
            "trainer": trainer, "data": _ReshardingSampler(p.sampler)}


class _ReshardingSampler:
    """The sampler as checkpoint state: its global position lets any dp degree resume exactly."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler = sampler

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.load_state_dict(state, allow_dp_change=True)
