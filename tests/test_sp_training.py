"""Training-level sequence parallelism: the real trainer with each SP method equals sp=1.

8 steps of the small model on packed documents (document masking on). Losses must agree within
fp32 tolerance (2e-5 relative: summation-order noise compounds over AdamW steps to ~1e-6;
a wrong mask, a mis-sharded position or label, or a missing gradient reduction moves the loss
by >1e-3 within a step or two), and gradients after the last step as in the DP tests.
"""

import pytest
import torch

from meshweave.testing import run_distributed
from meshweave.testing_equivalence import train_and_collect

STEPS = 8  # past warm-up and into the decay, with the optimizer's state in play


@pytest.fixture(scope="module")
def reference():
    return run_distributed(train_and_collect, 1, [], STEPS)[0]


def assert_same_training(results, reference):
    for res in results:
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(reference["losses"]), rtol=2e-5, atol=0)
        for name, g in res["grads"].items():
            torch.testing.assert_close(g, reference["grads"][name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("method", [pytest.param(m, marks=[] if m == "ring" else pytest.mark.slow)
                                    for m in ("ulysses", "ring", "tokenring", "allgather")])
def test_sp2_each_method_equals_single_process(method, reference):
    results = run_distributed(train_and_collect, 2, ["parallel.sp=2", f"parallel.sp_method={method}", "parallel.dp=1"], STEPS)
    assert_same_training(results, reference)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["parallel.sp=2", "parallel.dp=2", "parallel.sp_method=ring", "parallel.dp_mode=fsdp"],
    ["parallel.sp=2", "parallel.dp=2", "parallel.sp_method=ulysses", "parallel.dp_mode=ddp"],
    ["parallel.sp=4", "parallel.dp=1", "parallel.sp_method=usp", "parallel.usp.ulysses=2", "parallel.usp.ring=2"],
], ids=["ring-sp2-dp2-fsdp", "ulysses-sp2-dp2-ddp", "usp-2x2"])
def test_sp_composed_on_4_ranks_equals_single_process(overrides, reference):
    assert_same_training(run_distributed(train_and_collect, 4, overrides, STEPS), reference)


def test_reference_learns(reference):
    assert reference["losses"][-1] < reference["losses"][0] - 0.5
