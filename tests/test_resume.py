"""End-to-end resume through the real CLI and trainer: SIGKILL mid-run, torchrun restarts, other layouts.

Losses are compared bitwise (JSON round-trips floats exactly): on CPU in fp32 a resumed run must
reproduce the uninterrupted one exactly, step for step.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.tensor import DTensor

from meshweave.launch.env import free_port
from meshweave.testing import run_distributed
from meshweave.testing_equivalence import SMALL_TEST_CONFIG
from meshweave.train.build import build_trainer
from meshweave.train.config import load_config

STEPS = 8  # killed at step 4: enough steps on both sides of the kill to compare
# The CLI runs below are tp2, whose steps cost ~1 s each on CPU at the test config's 4 layers: 2 layers (every
# weight and its optimizer state still sharded, every code path the same) take ~10 s off each of the four runs.
SMALL = [f"--set={o}" for o in SMALL_TEST_CONFIG] + [f"--set=train.steps={STEPS}", "--set=logging.every_steps=1",
                                                    "--set=logging.jsonl=true", "--set=model.n_layers=2"]


def _cmd(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "meshweave", "train", "--nproc", "2", *SMALL, f"--set=run_dir={run_dir}", *extra]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics" / "rank0.jsonl"
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())] if path.exists() else []


# Sharded state through a real kill: TP shards every weight and its optimizer state. (FSDP's dp2 resume is checked
# in-process by tests/test_checkpoint_dist.py, which is minutes cheaper than another three CLI runs.)
LAYOUTS = {"tp2": ["--set=parallel.tp=2", "--set=parallel.dp=1"]}
_STRAIGHT: dict[str, dict[int, float]] = {}


def straight_losses(layout: str, tmp_path_factory) -> dict[int, float]:
    """Losses of the uninterrupted 2-process run of a layout, step by step (computed once per layout)."""
    if layout not in _STRAIGHT:
        run_dir = tmp_path_factory.mktemp(f"straight-{layout}")
        proc = subprocess.run(_cmd(run_dir, *LAYOUTS[layout]), check=False, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        _STRAIGHT[layout] = dict(_losses(run_dir))
        assert sorted(_STRAIGHT[layout]) == list(range(1, STEPS + 1))
    return _STRAIGHT[layout]


def _kill_when_step_logged(cmd: list[str], run_dir: Path, step: int) -> None:
    """Start the job in its own session and SIGKILL all of it once `step` is logged."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not any(s >= step for s, _ in _losses(run_dir)):
        assert proc.poll() is None, "the job ended before it could be killed"
        assert time.monotonic() < deadline, "the job did not reach the kill step in time"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigkill_then_resume_gives_identical_losses(layout, tmp_path, tmp_path_factory):
    expected = straight_losses(layout, tmp_path_factory)
    ckpt = [f"--set=checkpoint.dir={tmp_path / 'ckpt'}", "--set=checkpoint.every_steps=1", "--set=checkpoint.mode=lazy"]
    cmd = _cmd(tmp_path, *LAYOUTS[layout], *ckpt)
    _kill_when_step_logged(cmd, tmp_path, STEPS // 2)
    resumed = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint at step" in resumed.stdout
    logged = _losses(tmp_path)
    assert {s for s, _ in logged} == set(expected)
    for step, loss in logged:
        assert loss == expected[step], f"step {step}: {loss} != {expected[step]}"




@pytest.mark.slow
def test_torchrun_max_restarts_recovers_a_crashed_worker(tmp_path, tmp_path_factory):
    expected = straight_losses("tp2", tmp_path_factory)
    env = {**os.environ, "MESHWEAVE_FAULT": "crash:rank=1:step=7", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "-m", "meshweave", "train",
           *SMALL, *LAYOUTS["tp2"], f"--set=run_dir={tmp_path}", f"--set=checkpoint.dir={tmp_path / 'ckpt'}",
           "--set=checkpoint.every_steps=3"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "injected crash on rank 1 after step 7" in proc.stderr
    # The lazy save of step 6 may still be in flight when rank 1 dies after step 7: then step 3 is
    # the newest complete checkpoint. Either way the losses must be those of the uninterrupted run.
    resumed = re.search(r"resumed from checkpoint at step (\d+)", proc.stdout)
    assert resumed and int(resumed.group(1)) in (3, 6), proc.stdout[-2000:]
    logged = _losses(tmp_path)
    assert {s for s, _ in logged} == set(range(1, STEPS + 1))  # rank 0 may or may not log step 7 before it is stopped
    assert all(loss == expected[step] for step, loss in logged)


# --- resharding: save under one layout, load under another ------------------------------------

def _full(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu().clone()


def _state_snapshot(trainer):
    p = trainer.p
    named = {n: prm for part in p.model_parts for n, prm in part.named_parameters()}
    by_param = {id(prm): n for n, prm in named.items()}
    optim = {f"{by_param[id(prm)]}.{k}": _full(v) for prm, st in p.optimizer.state.items() for k, v in st.items()
             if torch.is_tensor(v) and v.dim() > 0}
    return {"model": {n: _full(prm) for n, prm in named.items()}, "optim": optim, "step": trainer.step,
            "sampler": p.sampler.state_dict(), "lr": p.optimizer.param_groups[0]["lr"]}


def _train_and_save(ckpt_dir: str, overrides: list[str]):
    cfg = load_config(None, SMALL_TEST_CONFIG + ["train.steps=3", f"checkpoint.dir={ckpt_dir}", "logging.jsonl=false",
                                                 f"run_dir={ckpt_dir}/run", *overrides])
    trainer = build_trainer(cfg)
    trainer.train()
    return _state_snapshot(trainer)


def _load_only(ckpt_dir: str, overrides: list[str]):
    cfg = load_config(None, SMALL_TEST_CONFIG + ["train.steps=3", f"checkpoint.dir={ckpt_dir}", "logging.jsonl=false",
                                                 f"run_dir={ckpt_dir}/run2", *overrides])
    trainer = build_trainer(cfg)
    assert trainer.p.checkpointer.load_latest(trainer.p.app_state) == 3
    snapshot = _state_snapshot(trainer)
    trainer.p.checkpointer.close()
    return snapshot


RESHARD_TARGETS = {"dp2": (2, ["parallel.dp=2"]), "dp2-tp2": (4, ["parallel.dp=2", "parallel.tp=2"])}


@pytest.fixture(scope="module")
def saved_under_dp4(tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("dp4")
    return ckpt_dir, run_distributed(_train_and_save, 4, str(ckpt_dir), ["parallel.dp=4"])[0]


@pytest.mark.slow  # four ranks save, then two load (test_checkpoint_dist keeps a resharding case in the fast subset)
@pytest.mark.parametrize("target", list(RESHARD_TARGETS))
def test_save_under_dp4_load_under_other_layout(target, saved_under_dp4):
    ckpt_dir, saved = saved_under_dp4
    world, overrides = RESHARD_TARGETS[target]
    for loaded in run_distributed(_load_only, world, str(ckpt_dir), overrides):
        assert loaded["step"] == saved["step"] == 3 and loaded["lr"] == saved["lr"]
        assert loaded["sampler"]["position"] == saved["sampler"]["position"]
        assert loaded["sampler"]["epoch"] == saved["sampler"]["epoch"]
        for kind in ("model", "optim"):
            assert set(loaded[kind]) == set(saved[kind]) and saved[kind]
            for name, value in saved[kind].items():
                assert torch.equal(loaded[kind][name], value), f"{kind} {name}"
