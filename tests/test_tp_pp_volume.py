"""TP and PP traffic in the ledger (measured by hooking DTensor's collectives and the pipeline's P2P
ops) equals the analytic per-step formulas, byte for byte; plus the layer split and stage placement."""

import tempfile

import pytest

from meshweave.models.llama.config import LlamaConfig
from meshweave.models.registry import model_spec
from meshweave.parallel.pipeline_split import split_by_cost, split_even, split_layers
from meshweave.parallel.pipeline_comm import pipeline_p2p_bytes
from meshweave.parallel.schedules import stage_ids_of_rank
from meshweave.parallel.tensor_parallel_comm import tensor_parallel_bytes
from meshweave.train.build import build_trainer
from meshweave.train.config import load_config
from meshweave.testing import run_distributed
from meshweave.testing_equivalence import SMALL_TEST_CONFIG


def measure_one_step(overrides: list[str]) -> dict:
    """Ledger of the second training step (the first also exchanges pipeline shape metadata)."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(None, SMALL_TEST_CONFIG + ["train.steps=3", "logging.comm_accounting=true", f"run_dir={run_dir}", *overrides])
        trainer = build_trainer(cfg)
        trainer.train_step()
        trainer.p.mesh.ledger.reset()
        trainer.train_step()
        stages = getattr(trainer.p.runner, "stages", [])
        out = {"ledger": trainer.p.mesh.ledger.snapshot(), "stage_ids": [s.stage_index for s in stages],
               "n_stages": stages[0].num_stages if stages else 1}
        trainer.p.mesh.close()
        return out


def expected(res: dict, tp: int, dp: int, n_layers: int = 4) -> dict[str, int]:
    tokens, dim = 8 // dp * 32, 64  # local rows x seq_len of the small test config
    ids, n = res["stage_ids"] or [0], res["n_stages"]
    layers = sum(len(split_even(n_layers, n)[s]) for s in ids)
    out = {}
    if tp > 1:
        tp_bytes = tensor_parallel_bytes(tokens, dim, tp, layers, 0 in ids, n - 1 in ids)
        out.update({f"tp/{op}": b for op, b in tp_bytes.items()})
    if n > 1:
        out.update({f"pp/{op}": b for op, b in pipeline_p2p_bytes(ids, n, tokens, dim, tp).items()})
    return out


def measured(res: dict) -> dict[str, int]:
    return {key: v["bytes"] for key, v in res["ledger"].items() if key.split("/")[0] in ("tp", "pp") and
            key != "pp/all_reduce"}  # the trainer's own loss/grad-norm reductions over pp are not P2P


@pytest.mark.parametrize("overrides,world,tp,dp", [
    (["parallel.tp=2"], 2, 2, 1),
    pytest.param(["parallel.tp=2", "parallel.pp=2", "parallel.pp_schedule=zbvzerobubble", "parallel.virtual_stages=2",
                  "parallel.microbatches=4"], 4, 2, 1, marks=pytest.mark.slow),
    (["parallel.dp=2", "parallel.pp=2", "parallel.microbatches=2"], 4, 1, 2),
], ids=["tp2", "tp2-pp2-zbv", "dp2-pp2-1f1b"])
def test_measured_bytes_equal_analytic(overrides, world, tp, dp):
    for res in run_distributed(measure_one_step, world, overrides):
        assert measured(res) == expected(res, tp, dp)


def test_cost_split_balances_embedding_and_head():
    cfg = LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=96, vocab_size=320)
    assert split_layers(model_spec("llama"), cfg, 32, 2, "cost") == [[0, 1], [2]]  # the head makes the last stage heavier
    assert split_by_cost([1.0] * 6, 3) == [[0, 1], [2, 3], [4, 5]]
    assert split_by_cost([1.0] * 7, 3, last_extra=2.0) == [[0, 1, 2], [3, 4, 5], [6]]  # the unique optimum
    assert split_even(8, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_stage_placement():
    assert [stage_ids_of_rank(r, 4, 2, "loop") for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert [stage_ids_of_rank(r, 4, 2, "v") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
