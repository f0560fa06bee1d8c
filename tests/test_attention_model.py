"""Training-level check: the small Llama with an SP attention op on 2 ranks trains like 1 rank.

Each rank holds its shard (in the method's layout) of tokens, position ids, labels and document
ids; the loss is the sum of cross-entropy over local tokens and gradients are summed over the SP
group, which is exactly the gradient of the full-sequence summed loss. 20 SGD steps on packed
documents must reproduce the single-process losses to fp32 rounding: any wrong mask, layout or
gradient would move them by far more than the 1e-5 relative tolerance after a few steps.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from meshweave.models.attention_api import install_ops
from meshweave.models.llama.config import LlamaConfig
from meshweave.models.llama.model import Transformer
from meshweave.testing import run_distributed
from tests.attention_helpers import Case, Groups, make_documents

SMALL = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48)
STEPS, BATCH, SEQ, LR = 20, 2, 32, 0.01


def _batch(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    docs = make_documents(BATCH, SEQ, seed=step)
    starts = torch.cat([torch.ones(BATCH, 1, dtype=torch.bool), docs[:, 1:] != docs[:, :-1]], dim=1)
    idx = torch.arange(SEQ).expand(BATCH, -1)
    last_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    tokens = torch.randint(0, SMALL.vocab_size, (BATCH, SEQ), generator=gen)
    return dict(
        tokens=tokens, labels=(3 * tokens + 1) % SMALL.vocab_size,  # learnable, so the loss falls
        positions=idx - last_start, docs=docs,
    )


def train_losses(method: str, ulysses: int | None = None) -> list[float]:
    """20 SGD steps; on >1 rank with the SP op installed and inputs sharded. Returns global losses."""
    groups = Groups([ulysses] if method == "usp" else [])
    op, _ = groups.op(Case(method, ulysses=ulysses))
    torch.manual_seed(0)
    model = Transformer(SMALL)
    if method != "local":
        install_ops(model, {"softmax": op})
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        batch = {k: op.shard(v) for k, v in _batch(step).items()}
        logits = model(batch["tokens"], batch["positions"], batch["docs"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            groups.sp.all_reduce(p.grad)
        losses.append(groups.sp.all_reduce(loss.detach().clone()).item())
        opt.step()
    groups.close()
    return losses


@pytest.fixture(scope="module")
def single_process_losses():
    return train_losses("local")


@pytest.mark.slow  # the fast subset's SP training check is tests/test_sp_training.py (ring)
@pytest.mark.parametrize("method,ulysses", [("ulysses", None), ("ring", None), ("tokenring", None), ("usp", 1), ("usp", 2)])
def test_sp2_training_matches_single_process(single_process_losses, method, ulysses):
    ranks = run_distributed(train_losses, 2, method, ulysses)
    assert ranks[0] == ranks[1]
    assert single_process_losses[-1] < single_process_losses[0]  # it does train
    torch.testing.assert_close(torch.tensor(ranks[0]), torch.tensor(single_process_losses), rtol=1e-5, atol=0)
