"""The `linear_llama` and `hybrid` kinds: config and spec, and training under sp (LASP-2 in the ring and ulysses
layouts, a hybrid's softmax layers on the configured method) alone and composed with dp, tp, pp and activation
checkpointing, equal to one process's losses, gradients and parameters.

Data: short synthetic documents (mean 6 tokens) so that every batch has document boundaries inside and across
shards, and the recurrent state must reset at each.

What is compared, and why not the parameters: in fp32 these models' gradients carry ~1e-6 relative rounding noise
(10x Llama's: un-normalised linear attention followed by a per-head RMS norm; measured fp32 vs fp64 on one
process), and AdamW turns noise in near-zero gradient entries into whole steps of size lr, so after a few steps
parameters of two exact layouts differ by ~1e-5 and their gradients by ~1e-6. So each layout is checked on the
gradients of the first forward/backward (before any step) and on the losses of 3 steps, both at test_tp_pp.py's
fp32 tolerance (2e-5 relative / 1e-7 absolute). Exactness itself is asserted in fp64 at the end of this file:
the same models' loss and gradients under SP equal one process's to 1e-10.
"""

from __future__ import annotations

import pytest
import torch

from meshweave.core.errors import ConfigError
from meshweave.models import linear_attention
from meshweave.models.linear_llama import flops
from meshweave.models.linear_llama.config import HybridConfig, LinearLlamaConfig, layer_kinds
from meshweave.models.registry import model_spec
from meshweave.models.spec import ParallelLayout
from meshweave.testing import run_distributed
from meshweave.testing_equivalence import merge_stage_results, train_and_collect
from meshweave.train.config import load_config
from meshweave.train.validate import check, validate
from tests.test_tp_pp import TOL

DOCS = ["data.source=synthetic", "data.synthetic_mean_len=6", "data.synthetic_max_len=40"]
KINDS = {"linear_llama": ["model.kind=linear_llama"], "hybrid": ["model.kind=hybrid", "model.softmax_every=2"]}


def _slot_kinds(model) -> list[str]:
    from meshweave.models.attention_api import attention_slots

    return [slot.kind for slot in attention_slots(model)]


def test_kinds_resolve_from_the_config_and_their_layers_take_the_right_slots():
    lin = load_config(None, KINDS["linear_llama"] + ["model.n_layers=3", "model.decay=retnet", "model.feature_map=relu"])
    hyb = load_config(None, ["model.kind=hybrid", "model.n_layers=8"])
    assert type(lin.model) is LinearLlamaConfig and type(hyb.model) is HybridConfig
    assert (lin.model.decay, lin.model.feature_map, hyb.model.softmax_every) == ("retnet", "relu", 4)
    assert layer_kinds(hyb.model) == ["linear"] * 3 + ["softmax"] + ["linear"] * 3 + ["softmax"]
    for cfg in (lin.model, hyb.model):
        spec = model_spec(cfg.kind)
        model = spec.build(cfg)
        assert _slot_kinds(model) == spec.attention_slots(cfg) == layer_kinds(cfg)
        assert sum(p.numel() for p in model.parameters()) == spec.parameter_count(cfg)
        assert not any("log_decay" in k for k in model.state_dict())  # a constant, not checkpointed


def test_bad_values_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="feature_map"):
        load_config(None, ["model.kind=linear_llama", "model.feature_map=cosine"])
    with pytest.raises(ConfigError, match="decay"):
        load_config(None, ["model.kind=linear_llama", "model.decay=xpos"])
    spec = model_spec("hybrid")
    layout = ParallelLayout(tp=1, sp=1, sp_method="ring", seq_len=64)
    assert spec.validate(HybridConfig(softmax_every=0), layout)[0].startswith("model.softmax_every: 0 must be >= 1")
    assert "leaves no softmax layer" in spec.validate(HybridConfig(n_layers=4, softmax_every=5), layout)[0]
    assert spec.validate(HybridConfig(), ParallelLayout(tp=3, sp=1, sp_method="ring", seq_len=64))[0].startswith(
        "parallel.tp")


def test_softmax_every_has_a_range():
    with pytest.raises(ConfigError, match=r"^model.softmax_every: 0 must be >= 1$"):
        check(load_config(None, ["model.kind=hybrid", "model.softmax_every=0"]), 1)


def uneven_heads(kind: str, seq_len: int = 64):
    """6 heads (dim 192) under ulysses at sp=4: they do not split over the ranks."""
    return load_config(None, [f"model.kind={kind}", "model.dim=192", "model.n_heads=6", "model.n_kv_heads=6",
                              f"train.seq_len={seq_len}", "parallel.sp=4", "parallel.dp=1", "parallel.sp_method=ulysses"])


def test_ulysses_needs_whole_heads_only_where_softmax_layers_split_them():
    assert validate(uneven_heads("linear_llama"), 4) == []  # LASP-2 (every layer linear) splits no heads
    for kind in ("hybrid", "llama"):
        (problem,) = validate(uneven_heads(kind), 4)
        assert problem.startswith("parallel.sp: ulysses needs model.n_heads (6) divisible by sp (4)") and "\n" not in problem
    (problem,) = validate(uneven_heads("linear_llama", seq_len=66), 4)  # the layout's own rule still holds
    assert problem.startswith("train.seq_len: ulysses needs seq_len (66) divisible by sp (4)")


def test_flops_count_the_linear_layers_as_linear_in_the_sequence_length():
    assert flops.KERNEL_CHUNK == linear_attention.DEFAULT_CHUNK
    lin, llama = LinearLlamaConfig(), load_config(None, []).model
    grow = lambda spec, cfg: spec.flops_per_token(cfg, 65536) - spec.flops_per_token(cfg, 8192)
    assert grow(model_spec("linear_llama"), lin) == 0.0 < grow(model_spec("llama"), llama)
    costs = model_spec("hybrid").layer_costs(HybridConfig(), 4096).layers
    assert costs[3] > costs[0] == costs[1] == costs[2]  # the softmax layer is the expensive one


def train(overrides: list[str], steps: int = 3):
    return train_and_collect(DOCS + overrides, steps)


def train_and_first_grads(overrides: list[str]) -> dict:
    """Losses of 3 steps, and the gradients of the first forward/backward (taken before any step)."""
    return {"losses": train(overrides, 3)["losses"], "grads": train(overrides, 0)["grads"]}


def assert_matches_reference(results: list[dict], reference: dict) -> None:
    for res in results:
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(reference["losses"]), **TOL)
    grads = merge_stage_results(results)
    assert set(grads) == set(reference["grads"])  # every parameter is owned by some stage
    for name, g in grads.items():
        torch.testing.assert_close(g, reference["grads"][name], **TOL, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def references():
    return {kind: run_distributed(train_and_first_grads, 1, extra)[0] for kind, extra in KINDS.items()}


def test_the_kinds_differ_from_llama_and_from_each_other(references):
    llama = run_distributed(train, 1, [])[0]["losses"][-1]
    lin, hyb = references["linear_llama"]["losses"][-1], references["hybrid"]["losses"][-1]
    assert min(abs(lin - llama), abs(hyb - llama), abs(lin - hyb)) > 1e-4


LAYOUTS = {
    "sp2-ring": ["parallel.sp=2", "parallel.sp_method=ring"],
    "sp2-ulysses": ["parallel.sp=2", "parallel.sp_method=ulysses"],
    "sp2-ring-ac": ["parallel.sp=2", "parallel.sp_method=ring", "parallel.activation_checkpointing=true"],
    "sp2-dp2": ["parallel.sp=2", "parallel.dp=2", "parallel.sp_method=ring"],
    "sp2-tp2": ["parallel.sp=2", "parallel.tp=2", "parallel.sp_method=ulysses"],
    "sp2-pp2": ["parallel.sp=2", "parallel.pp=2", "parallel.microbatches=2", "parallel.sp_method=ring"],
    "sp4-usp": ["parallel.sp=4", "parallel.sp_method=usp", "parallel.usp.ulysses=2"],
    "sp2-allgather": ["parallel.sp=2", "parallel.sp_method=allgather"],  # a hybrid's softmax layers: LASP-2H
    "sp2-dp2-allgather": ["parallel.sp=2", "parallel.dp=2", "parallel.sp_method=allgather"],
}
# (kind, layout): both kinds on both sp layouts; each composition at least once, on 4 ranks (5-40 s each on 2
# shared cores: the fast subset keeps one layout per kind and LASP-2H). All of them pass for both kinds.
CASES = [
    ("linear_llama", "sp2-ring"), ("hybrid", "sp2-ring"), ("hybrid", "sp2-allgather"),
    pytest.param("linear_llama", "sp2-ulysses", marks=pytest.mark.slow),
    pytest.param("hybrid", "sp2-ulysses", marks=pytest.mark.slow),
    pytest.param("hybrid", "sp2-ring-ac", marks=pytest.mark.slow),
    pytest.param("hybrid", "sp2-tp2", marks=pytest.mark.slow),
    pytest.param("linear_llama", "sp2-pp2", marks=pytest.mark.slow),
    pytest.param("linear_llama", "sp2-dp2", marks=pytest.mark.slow),
    pytest.param("linear_llama", "sp2-tp2", marks=pytest.mark.slow),
    pytest.param("hybrid", "sp2-pp2", marks=pytest.mark.slow),
    pytest.param("hybrid", "sp4-usp", marks=pytest.mark.slow),
    pytest.param("hybrid", "sp2-dp2-allgather", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind,layout", CASES)
def test_training_matches_one_process(kind, layout, references):
    overrides = LAYOUTS[layout]
    world = 4 if any(o in overrides for o in ("parallel.sp=4", "parallel.dp=2", "parallel.tp=2", "parallel.pp=2")) else 2
    assert_matches_reference(run_distributed(train_and_first_grads, world, KINDS[kind] + overrides), references[kind])


def test_tensor_parallel_ranks_keep_their_heads_decay():
    """ShardHeads keeps the tp rank's contiguous run of heads (the heads wq's column split gives it)."""
    from meshweave.models.linear_llama.model import HeadDecay
    from meshweave.models.linear_llama.parts import ShardHeads

    class Mesh:
        def __init__(self, rank):
            self.rank = rank

        def size(self):
            return 2

        def get_local_rank(self):
            return self.rank

    full = HeadDecay("alibi", 8).log_decay
    halves = [ShardHeads()._apply(HeadDecay("alibi", 8), Mesh(r)).log_decay for r in (0, 1)]
    assert torch.equal(torch.cat(halves), full) and halves[0].shape == (4,)
    assert ShardHeads()._apply(HeadDecay("none", 8), Mesh(1)).log_decay is None


# --- fp64, model level: the same model's loss and gradients under SP equal one process's to 1e-10 -------------
def _fp64_model_and_batch(kind_overrides: list[str]):
    cfg = load_config(None, ["model.dim=32", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2",
                             "model.ffn_hidden=48", *kind_overrides]).model
    torch.manual_seed(0)
    model = model_spec(cfg.kind).build(cfg).double()
    gen = torch.Generator().manual_seed(1)
    b, n = 2, 32
    tokens, labels = torch.randint(0, cfg.vocab_size, (2, b, n), generator=gen)
    docs = torch.cumsum((torch.rand(b, n, generator=gen) < 0.2).long(), 1)
    docs[:, n // 4:] += 1  # a boundary exactly on a shard edge of both layouts
    return model, dict(tokens=tokens, positions=torch.arange(n).expand(b, -1), docs=docs, labels=labels)


def _loss_sum(model, batch) -> torch.Tensor:
    logits = model(batch["tokens"], batch["positions"], batch["docs"])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")


def sp_model_grads(kind_overrides: list[str], method: str) -> dict:
    """On every rank of the world: "softmax" slots get `method`, "linear" slots LASP-2 in its layout; the batch is
    sharded with that layout; loss and gradients are summed over the ranks."""
    import torch.distributed as dist

    from meshweave.attention import build_attention_op
    from meshweave.attention.lasp2 import lasp2_for_layout
    from meshweave.core.comm import CommGroup, CommLedger
    from meshweave.models.attention_api import install_ops

    model, batch = _fp64_model_and_batch(kind_overrides)
    ranks = list(range(dist.get_world_size()))
    group = CommGroup("sp", dist.new_group(ranks), ranks, CommLedger())
    softmax = build_attention_op(method, group)
    install_ops(model, {"softmax": softmax, "linear": lasp2_for_layout(group, softmax)})
    loss = _loss_sum(model, {name: softmax.shard(t, dim=1) for name, t in batch.items()})
    loss.backward()
    grads = {name: group.all_reduce(prm.grad.clone()) for name, prm in model.named_parameters()}
    return {"loss": group.all_reduce(loss.detach().clone()), "grads": grads}


@pytest.mark.parametrize("kind,method", [(kind, method) for kind in KINDS for method in ("ring", "ulysses")]
                         + [("hybrid", "allgather")])  # LASP-2 and, on the softmax layers, all-gather K/V
def test_fp64_model_under_sequence_parallelism_equals_one_process(kind, method):
    model, batch = _fp64_model_and_batch(KINDS[kind])
    loss = _loss_sum(model, batch)
    loss.backward()
    got = run_distributed(sp_model_grads, 2, KINDS[kind], method)[0]
    torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-10, rtol=1e-10)
    for name, prm in model.named_parameters():
        torch.testing.assert_close(got["grads"][name], prm.grad, atol=1e-10, rtol=1e-10, msg=lambda m: f"{name}: {m}")


def test_every_feature_map_and_decay_of_the_config_exists():
    from typing import get_args

    from meshweave.models.linear_llama.config import Decay, FeatureMap

    assert set(get_args(FeatureMap)) == set(linear_attention.FEATURE_MAPS)
    for decay in get_args(Decay):
        linear_attention.head_log_decay(decay, 4)


def test_linear_layers_read_nothing_back_to_the_host():
    """LASP-2's per-batch plan (document boundaries, segment coefficients) stays on the device: a linear_llama
    step under sp2 with packed documents makes no host read outside log steps (cf. tests/test_host_syncs.py,
    where ring's softmax plans make one per batch)."""
    from tests.test_host_syncs import steps_and_their_host_reads

    overrides = [*KINDS["linear_llama"], "parallel.sp=2", "parallel.sp_method=ring"]
    for rank, per_step in enumerate(run_distributed(steps_and_their_host_reads, 2, overrides, 4, 3)):
        for s in per_step:
            assert s["step_reads"] == {}, f"rank {rank} step {s['step']} read to the host: {s['step_reads']}"
