"""A tiny training loop for the checkpoint tests, and a command line to run it in a subprocess.

The loop draws each step's batch from the global torch RNG (so resuming exactly needs the RNG state
restored), uses AdamW with a LinearLR schedule (optimizer and schedule state must come back), and
keeps a data position (a sampler that must not skip or repeat). `python -m tests.checkpoint_support
DIR STEPS ...` trains with checkpointing; the crash tests run it with MESHWEAVE_CKPT_CRASH_AT set.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from meshweave.checkpoint import Checkpointer, CheckpointSettings, ModelState, OptimizerState
from meshweave.checkpoint.state import flatten
from meshweave.models.llama.config import LlamaConfig
from meshweave.models.llama.model import Transformer

TINY = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48)
GLOBAL_BATCH, SEQ = 4, 9


@pytest.fixture(autouse=True, scope="module")
def one_intra_op_thread():
    """Tiny models run fastest on one thread; two OpenMP threads on a busy 2-core machine crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TrainerState:
    """Step counter, RNG state and LR schedule (what the real trainer will own)."""

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.step, self.scheduler = 0, scheduler

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "rng": torch.get_rng_state(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = sd["step"]
        torch.set_rng_state(sd["rng"])
        self.scheduler.load_state_dict(sd["scheduler"])


class SamplerState:
    """Global sample position and the dp degree it was recorded under (identical on every rank)."""

    def __init__(self, dp: int) -> None:
        self.position, self.dp = 0, dp

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "dp": self.dp}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.position = sd["position"]  # global: valid under any dp degree


class TinyRun:
    """Model + optimizer + schedule + state wrappers; FSDP2-sharded over `mesh` when given."""

    def __init__(self, mesh=None, seed: int = 0, split_stages: bool = False) -> None:
        torch.manual_seed(seed)
        model = Transformer(TINY)
        if mesh is not None:
            from torch.distributed.fsdp import fully_shard

            for layer in model.layers.values():
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        self.model, self.dp = model, (mesh.size() if mesh is not None else 1)
        self.rank = mesh.get_local_rank() if mesh is not None else 0
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        self.sched = torch.optim.lr_scheduler.LinearLR(self.opt, start_factor=1.0, end_factor=0.2, total_iters=30)
        self.trainer, self.sampler = TrainerState(self.sched), SamplerState(self.dp)
        self.app_state = {"model": ModelState([model]), "optimizer": OptimizerState([model], [self.opt]),
                          "trainer": self.trainer, "data": self.sampler}

    def step(self, ckpt: Checkpointer | None = None) -> float:
        """One optimizer step; returns this rank's loss."""
        batch = torch.randint(0, TINY.vocab_size, (GLOBAL_BATCH, SEQ))
        per_rank = GLOBAL_BATCH // self.dp
        tokens = batch[self.rank * per_rank:(self.rank + 1) * per_rank]
        logits = self.model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, TINY.vocab_size), tokens[:, 1:].reshape(-1))
        loss.backward()
        if ckpt is not None:
            ckpt.before_optimizer_step()
        self.opt.step()
        self.opt.zero_grad()
        self.sched.step()
        self.trainer.step += 1
        self.sampler.position += GLOBAL_BATCH
        if ckpt is not None:
            ckpt.after_optimizer_step(self.trainer.step, self.app_state)
        return loss.item()


def full_state(run: TinyRun) -> dict[str, Any]:
    """Every model/optimizer leaf as a full (unsharded) CPU value; collective under FSDP."""
    from torch.distributed.tensor import DTensor

    flat = flatten({"model": run.app_state["model"].state_dict(), "optimizer": run.app_state["optimizer"].state_dict()})
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() if isinstance(v, torch.Tensor) else v
            for k, v in flat.items()}


def same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """assert_same_state as a value (for workers, which return results instead of raising)."""
    try:
        assert_same_state(a, b)
        return True
    except AssertionError:
        return False


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), f"{k} differs"
        else:
            assert a[k] == b[k], f"{k}: {a[k]!r} != {b[k]!r}"


def settings(directory: str, **kw: Any) -> CheckpointSettings:
    return CheckpointSettings(dir=directory, **{"every_steps": 1, **kw})


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("steps", type=int)
    p.add_argument("--mode", default="lazy")
    p.add_argument("--levels", default="local")
    p.add_argument("--persistent-dir")
    p.add_argument("--keep", type=int, default=3)
    a = p.parse_args(argv)
    cfg = settings(a.dir, mode=a.mode, levels=a.levels.split(","), persistent_dir=a.persistent_dir, keep=a.keep)
    run = TinyRun()
    ckpt = Checkpointer(cfg, None, 0, 1)
    start = ckpt.load_latest(run.app_state) or 0
    losses = [run.step(ckpt) for _ in range(start, a.steps)]
    ckpt.close()
    print(json.dumps({"start": start, "losses": losses}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
