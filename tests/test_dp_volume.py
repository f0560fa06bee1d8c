"""Data-parallel traffic recorded in the ledger equals the analytic volume, per optimizer step.

FSDP2 over N ranks, per unit u (embeddings, each block, [final norm + head]; the root holds none)
with shard s_u = sum over its params of ceil(dim0 / N) * (numel / dim0) elements (dim 0 padded to N):
  all-gather input: s_u before forward, and again before backward except for [norm + head], which
  stays gathered -> 2 * (s_emb + sum_blocks s_u) + s_head per micro-step;
  reduce-scatter input: N * s_u per unit, once per optimizer step (earlier micro-steps do not sync).
DDP: the all-reduced buckets hold every gradient once per optimizer step: 4 * P bytes in fp32.
"""

import math

import pytest

from meshweave.models.llama.model import Transformer
from meshweave.testing import run_distributed
from meshweave.testing_equivalence import SMALL_TEST_CONFIG
from meshweave.train.build import build_trainer
from meshweave.train.config import load_config


def _one_step_ledger(overrides):
    import tempfile
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(None, SMALL_TEST_CONFIG + ["train.steps=1", "logging.comm_accounting=true", f"run_dir={run_dir}", *overrides])
        trainer = build_trainer(cfg)
        trainer.p.mesh.ledger.reset()
        trainer.train_step()
        snapshot = trainer.p.mesh.ledger.snapshot()
        trainer.p.mesh.close()
        return snapshot


def _shard_elems(module, n):
    return sum(math.ceil(p.shape[0] / n) * (p.numel() // p.shape[0]) for p in module.parameters(recurse=False))


def _units(n):
    model = Transformer(load_config(None, SMALL_TEST_CONFIG).model)
    blocks = [sum(_shard_elems(m, n) for m in block.modules()) for block in model.layers.values()]
    emb = _shard_elems(model.tok_embeddings, n)
    head = _shard_elems(model.norm, n) + _shard_elems(model.output, n)
    return blocks, emb, head, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("accum", [1, 2])
def test_fsdp_volume_matches_formula(accum):
    n = 2
    blocks, emb, head, _ = _units(n)
    for ledger in run_distributed(_one_step_ledger, n, ["parallel.dp=2", "parallel.dp_mode=fsdp", f"train.grad_accum={accum}"]):
        gather, scatter = ledger["dp_sp:fsdp/all_gather"], ledger["dp_sp:fsdp/reduce_scatter"]
        assert gather == {"calls": accum * (2 * (1 + len(blocks)) + 1), "bytes": accum * 4 * (2 * (emb + sum(blocks)) + head)}
        assert scatter == {"calls": len(blocks) + 2, "bytes": 4 * n * (emb + sum(blocks) + head)}


@pytest.mark.parametrize("accum", [1, 2])
def test_ddp_volume_matches_formula(accum):
    *_, params = _units(2)
    for ledger in run_distributed(_one_step_ledger, 2, ["parallel.dp=2", "parallel.dp_mode=ddp", f"train.grad_accum={accum}"]):
        assert ledger["dp_sp:ddp/all_reduce"]["bytes"] == 4 * params
        # the trainer's own scalars: target-token count over dp, loss sum over dp x sp
        assert ledger["dp/all_reduce"] == {"calls": 1, "bytes": 8} and ledger["dp_sp/all_reduce"] == {"calls": 1, "bytes": 8}
