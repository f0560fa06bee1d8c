"""Run the real trainer under some layout and collect what equivalence tests compare.

`train_and_collect(overrides, steps)` (a task for meshweave.testing.run_distributed) builds the
trainer from the small test config plus overrides, runs `steps` optimizer steps, then one more
forward+backward without stepping, and returns the per-step losses, the full (unsharded) gradients
of that last backward and the full parameters. Any layout must reproduce the one-process result.
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from meshweave.train.build import build_trainer
from meshweave.train.config import load_config

SMALL_TEST_CONFIG = [
    "model.dim=64", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=96",
    "model.vocab_size=320", "train.seq_len=32", "train.global_batch=8", "train.warmup_steps=1", "train.lr=1e-3",
    "data.max_bytes=200000", "logging.jsonl=false", "logging.every_steps=1000",
]


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def train_and_collect(overrides: list[str], steps: int = 3) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(None, SMALL_TEST_CONFIG + [f"train.steps={steps + 1}", f"run_dir={run_dir}", *overrides])
        trainer = build_trainer(cfg)
        losses = [float(trainer.train_step().loss) for _ in range(steps)]
        p = trainer.p
        batch = p.dataset.batch(p.sampler.next_local_rows()).to(p.device)
        p.runner.forward_backward(batch, trainer.global_target_count(batch))
        named = [(n, prm) for part in p.model_parts for n, prm in part.named_parameters()]
        grads = {n: _full(prm.grad) for n, prm in named if prm.grad is not None}
        params = {n: _full(prm) for n, prm in named}
        p.mesh.close()
        return {"losses": losses, "grads": grads, "params": params, "coordinate": p.mesh.coordinate}


def train_with_checkpoints(config: list[str], stop_after: int | None, checkpoint_dir: str | None,
                           steps: int = 6) -> list[float]:
    """`steps` steps of the trainer on `config` (a full list of overrides), checkpointing every 2 into
    `checkpoint_dir` and resuming from it when it holds one, or only the first `stop_after` of them (the
    schedule still that of `steps`); the losses of the steps run. For exact-resume tests."""
    with tempfile.TemporaryDirectory() as run_dir:
        ckpt = [f"checkpoint.dir={checkpoint_dir}", "checkpoint.every_steps=2", "checkpoint.mode=sync"] if checkpoint_dir else []
        trainer = build_trainer(load_config(None, [*config, f"train.steps={steps}", f"run_dir={run_dir}", *ckpt]))
        if stop_after is None:
            losses = trainer.train()
        else:
            losses = [float(trainer.train_step().loss) for _ in range(stop_after)]
            trainer.p.checkpointer.close()
        trainer.p.mesh.close()
        return losses


def merge_stage_results(results: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Union of gradients over ranks (pipeline stages hold disjoint layers; duplicates must agree)."""
    merged: dict[str, torch.Tensor] = {}
    for res in results:
        for name, g in res["grads"].items():
            if name in merged:
                torch.testing.assert_close(g, merged[name], rtol=0, atol=0)
            merged[name] = g
    return merged
