"""DP=2 (FSDP2 and DDP), with and without gradient accumulation, equals one process on the same global batch.

Tolerances: fp32 throughout. A wrong reduction (missing, double-counted or mis-normalised rank)
changes gradients by O(1) relative; reordered fp32 summation changes them by ~1e-7 relative. We
allow 2e-5 relative / 1e-7 absolute on gradients and losses, and 1e-5 absolute on parameters after
three AdamW steps (AdamW divides by sqrt(v), which magnifies rounding where gradients are tiny).
"""

import pytest
import torch

from meshweave.testing import run_distributed
from meshweave.testing_equivalence import merge_stage_results, train_and_collect


@pytest.fixture(scope="module")
def reference():
    return run_distributed(train_and_collect, 1, [])[0]


def assert_matches_reference(results, reference):
    for res in results:
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(reference["losses"]), rtol=2e-5, atol=1e-7)
    grads = merge_stage_results(results)
    assert set(grads) == set(reference["grads"])
    for name, g in grads.items():
        torch.testing.assert_close(g, reference["grads"][name], rtol=2e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")
    for res in results:
        for name, prm in res["params"].items():
            torch.testing.assert_close(prm, reference["params"][name], rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("overrides", [
    ["parallel.dp=2", "parallel.dp_mode=fsdp"],
    ["parallel.dp=2", "parallel.dp_mode=ddp"],
    ["parallel.dp=2", "parallel.dp_mode=fsdp", "train.grad_accum=2"],
    ["parallel.dp=2", "parallel.dp_mode=ddp", "parallel.activation_checkpointing=true"],
], ids=["fsdp", "ddp", "fsdp-accum2", "ddp-ac"])
def test_dp2_equals_single_process(overrides, reference):
    assert_matches_reference(run_distributed(train_and_collect, 2, overrides), reference)


def test_reference_actually_learns(reference):
    """Guard against comparing two broken runs: the loss must fall over the three steps."""
    assert reference["losses"][-1] < reference["losses"][0]


@pytest.mark.parametrize("overrides", [
    ["parallel.dp=2", "parallel.dp_mode=fsdp", "train.dtype=bfloat16"],  # FSDP2 mixed precision: bf16 params in compute
    ["parallel.dp=2", "parallel.dp_mode=ddp", "train.dtype=bfloat16"],  # autocast
], ids=["fsdp-bf16", "ddp-bf16"])
def test_bf16_compute_tracks_fp32(overrides, reference):
    """bf16 compute with fp32 master weights: losses within bf16 rounding (~3 significant digits) of fp32,
    and the master weights stay fp32."""
    results = run_distributed(train_and_collect, 2, overrides)
    for res in results:
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(reference["losses"]), rtol=2e-2, atol=0)
        assert all(p.dtype == torch.float32 for p in res["params"].values())
        assert res["losses"] != reference["losses"]  # bf16 really was used
