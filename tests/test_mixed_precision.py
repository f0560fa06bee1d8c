"""train.dtype bf16 computes in bf16 wherever FSDP2's MixedPrecisionPolicy does not apply (parallel/compose.py:
autocast_dtype): here a single rank with dp_mode fsdp, where nothing is FSDP-wrapped, used to train in fp32.

CPU autocast supports bf16, so one gloo process shows it: the model's Linear layers output bf16, the master
weights stay fp32, and the losses equal those of the same run with dp_mode ddp (the same path: autocast over
an unwrapped model), and differ from the fp32 run's.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch.nn as nn

from meshweave.testing import run_distributed


def linear_dtypes_and_losses(overrides: list[str], steps: int = 2) -> dict:
    """Train `steps` steps; the dtypes the model's Linear layers produced, the parameter dtypes, the losses."""
    from meshweave.testing_equivalence import SMALL_TEST_CONFIG
    from meshweave.train.build import build_trainer
    from meshweave.train.config import load_config

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(None, SMALL_TEST_CONFIG + [f"train.steps={steps + 1}", f"run_dir={run_dir}", *overrides])
        trainer = build_trainer(cfg)
        seen: set[str] = set()
        linears = [m for part in trainer.p.model_parts for m in part.modules() if isinstance(m, nn.Linear)]
        for m in linears:
            m.register_forward_hook(lambda _m, _args, out: seen.add(str(out.dtype)))
        losses = [float(trainer.train_step().loss) for _ in range(steps)]
        params = {str(p.dtype) for part in trainer.p.model_parts for p in part.parameters()}
        trainer.p.mesh.close()
        return {"linears": len(linears), "outputs": seen, "params": params, "losses": losses}


@pytest.fixture(scope="module")
def runs() -> dict[str, dict]:
    cases = {
        "fsdp-bf16": ["parallel.dp_mode=fsdp", "train.dtype=bfloat16"],
        "ddp-bf16": ["parallel.dp_mode=ddp", "train.dtype=bfloat16"],
        "fp32": ["train.dtype=float32"],
    }
    return {name: run_distributed(linear_dtypes_and_losses, 1, overrides)[0] for name, overrides in cases.items()}


def test_single_rank_fsdp_bf16_runs_matmuls_in_bf16(runs):
    r = runs["fsdp-bf16"]
    assert r["linears"] > 0
    assert r["outputs"] == {"torch.bfloat16"}, r["outputs"]
    assert r["params"] == {"torch.float32"}  # fp32 master weights


def test_single_rank_fsdp_and_ddp_bf16_losses_match(runs):
    assert runs["fsdp-bf16"]["losses"] == runs["ddp-bf16"]["losses"]
    assert runs["ddp-bf16"]["outputs"] == {"torch.bfloat16"}


def test_bf16_tracks_fp32_and_really_differs(runs):
    bf16, fp32 = runs["fsdp-bf16"]["losses"], runs["fp32"]["losses"]
    assert runs["fp32"]["outputs"] == {"torch.float32"}
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=2e-2, atol=0)
    assert bf16 != fp32
