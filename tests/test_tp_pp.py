"""Tensor and pipeline parallelism, composed with FSDP2 / DDP, equal one process on the same global batch.

Each layout runs the real trainer for 3 optimizer steps (AdamW, warm-up, global-norm clipping) on
the small test config and then one more forward+backward; the per-step losses, every parameter's
full gradient of that last backward (merged over pipeline stages, gathered over TP shards) and
every parameter after the 3 steps must equal the one-process run.

Tolerances (fp32 throughout), as in test_data_parallel: losses and gradients 2e-5 relative /
1e-7 absolute, parameters 1e-5 absolute. A wrong reduction is an O(1) relative error: a gradient
summed instead of averaged over dp (x2), a microbatch loss divided by its own target count instead
of the global one (x microbatches, and unequal per microbatch), a TP partial sum never reduced (the
sharded half of the contribution missing), a norm weight's gradient from one sequence shard only
(x1/tp), a stage's gradient left out of the clipping norm (the clip factor changes the whole update)
— each is at least 1e-2 relative, four orders above fp32 reordering noise (~1e-7). The default
grad_clip (1.0) is below the gradient norm here (test_clipping_is_active_in_these_runs).
Mutation checks done by hand (on a copy of the tree): dropping the dp x sp scale from the pipeline
loss fails dp2-pp2-fsdp-1f1b-ac; dividing each microbatch's loss by its own target count fails
pp2-1f1b-short-docs (it passes on the builtin data, whose microbatches hold equal target counts:
hence the short-document case); leaving the pp all-reduce out of the grad norm fails it too
(~46% of a gradient's elements off); removing SequenceParallel from ffn_norm fails tp2 (with an
error: a plain norm output meets the DTensor plan of the FFN).
"""

import pytest
import torch

from meshweave.testing import run_distributed
from meshweave.testing_equivalence import merge_stage_results, train_and_collect

TOL = {"rtol": 2e-5, "atol": 1e-7}


@pytest.fixture(scope="module")
def reference():
    return run_distributed(train_and_collect, 1, [])[0]


def assert_matches_reference(results, reference):
    for res in results:
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(reference["losses"]), **TOL)
    grads = merge_stage_results(results)
    assert set(grads) == set(reference["grads"])  # every parameter is owned by some stage
    for name, g in grads.items():
        torch.testing.assert_close(g, reference["grads"][name], **TOL, msg=lambda m: f"{name}: {m}")
    for res in results:
        for name, prm in res["params"].items():
            torch.testing.assert_close(prm, reference["params"][name], rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


def layout(dp: int, tp: int, pp: int, *extra: str) -> list[str]:
    return [f"parallel.dp={dp}", f"parallel.tp={tp}", f"parallel.pp={pp}", *extra]


# (dp, tp, pp) with every schedule at least once, FSDP2 and DDP each at least once.
# microbatches=2 on dp=2 rows: the local batch is 4 rows; 4 layers split into pp*virtual stages.
CASES = {
    "tp2": layout(1, 2, 1),
    # short synthetic documents: microbatches hold unequal numbers of target tokens, so a per-microbatch
    # mean (instead of the global token count) would weight them wrongly
    "pp2-1f1b-short-docs": layout(1, 1, 2, "parallel.pp_schedule=1f1b", "parallel.microbatches=4",
                                  "data.source=synthetic", "data.synthetic_mean_len=6", "data.synthetic_max_len=40"),
    "pp2-gpipe-cost-split": layout(1, 1, 2, "parallel.pp_schedule=gpipe", "parallel.microbatches=2",
                                   "parallel.pp_split=cost", "model.n_layers=3"),
    "pp2-interleavedzerobubble": layout(1, 1, 2, "parallel.pp_schedule=interleavedzerobubble",
                                        "parallel.virtual_stages=2", "parallel.microbatches=4"),
    "pp2-loopedbfs": layout(1, 1, 2, "parallel.pp_schedule=loopedbfs", "parallel.virtual_stages=2",
                            "parallel.microbatches=2"),
    "pp2-dualpipev": layout(1, 1, 2, "parallel.pp_schedule=dualpipev", "parallel.virtual_stages=2",
                            "parallel.microbatches=4"),
    "dp2-tp2-fsdp": layout(2, 2, 1, "parallel.dp_mode=fsdp"),
    "dp2-pp2-ddp-gpipe": layout(2, 1, 2, "parallel.dp_mode=ddp", "parallel.pp_schedule=gpipe",
                                "parallel.microbatches=2"),
    "dp2-pp2-fsdp-1f1b-ac": layout(2, 1, 2, "parallel.dp_mode=fsdp", "parallel.pp_schedule=1f1b",
                                   "parallel.microbatches=2", "parallel.activation_checkpointing=true"),
    "tp2-pp2-interleaved1f1b": layout(1, 2, 2, "parallel.pp_schedule=interleaved1f1b", "parallel.virtual_stages=2",
                                      "parallel.microbatches=4"),
    # composed with sequence-parallel attention (ring, zigzag shards): TP over each SP shard's tokens
    "sp2-tp2": layout(1, 2, 1, "parallel.sp=2"),
    "sp2-pp2-1f1b": layout(1, 1, 2, "parallel.sp=2", "parallel.microbatches=2"),
    "dp2-tp2-pp2-fsdp-zbv": layout(2, 2, 2, "parallel.dp_mode=fsdp", "parallel.pp_schedule=zbvzerobubble",
                                   "parallel.virtual_stages=2", "parallel.microbatches=2"),
}


# Layouts on 4 or 8 ranks take several times longer on 2 cores: in the full suite only.
SLOW_CASES = {"dp2-tp2-fsdp", "dp2-pp2-ddp-gpipe", "dp2-pp2-fsdp-1f1b-ac", "tp2-pp2-interleaved1f1b", "sp2-tp2",
              "sp2-pp2-1f1b", "dp2-tp2-pp2-fsdp-zbv"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n for n in CASES])
def test_layout_equals_single_process(name, reference):
    overrides = CASES[name]
    dims = {k: int(v) for o in overrides for k, v in [o.split("=")] if k in ("parallel.dp", "parallel.tp", "parallel.pp")}
    world = dims["parallel.dp"] * dims["parallel.tp"] * dims["parallel.pp"] * (2 if "parallel.sp=2" in overrides else 1)
    own = [o for o in overrides if not o.startswith("parallel.")]
    if own:  # a different model or data: compare with its own one-process run
        reference = run_distributed(train_and_collect, 1, own)[0]
    assert_matches_reference(run_distributed(train_and_collect, world, overrides), reference)


def test_reference_actually_learns(reference):
    """Guard against comparing two broken runs: the loss must fall over the three steps."""
    assert reference["losses"][-1] < reference["losses"][0]


def test_clipping_is_active_in_these_runs(reference):
    """The runs clip at the default grad_clip 1.0; the gradient norm is above it, so every layout's
    update depends on a correct global norm over tp shards, pipeline stages and dp replicas."""
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in reference["grads"].values()))
    assert norm > 1.0


BAD_LAYOUTS = [
    (["parallel.tp=2", "model.n_heads=3", "model.n_kv_heads=1", "model.dim=96"], 2,
     "parallel.tp: model.n_heads 3 is not divisible by tp 2"),
    (["parallel.tp=4", "model.n_kv_heads=2"], 4, "model.n_kv_heads 2 is not divisible by tp 4"),
    (["parallel.pp=2", "model.n_layers=3", "parallel.microbatches=2"], 2,
     "model.n_layers: 3 layers do not split evenly into pp*virtual_stages = 2 stages"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved1f1b", "parallel.virtual_stages=3", "parallel.microbatches=2"],
     2, "model.n_layers: 4 layers do not split evenly into pp*virtual_stages = 6"),
    (["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.microbatches=1"], 2,
     "parallel.microbatches: 1f1b needs microbatches >= pp (1 < 2)"),
    (["parallel.pp=2", "parallel.pp_schedule=chimera", "parallel.microbatches=2"], 2,
     "parallel.pp_schedule: 'chimera' is not available; choose one of gpipe, 1f1b, interleaved1f1b"),
    (["parallel.pp=2", "parallel.pp_schedule=zbvzerobubble", "parallel.virtual_stages=4", "parallel.microbatches=2"],
     2, "schedule zbvzerobubble places exactly 2 stages per rank"),
    (["parallel.pp=2", "parallel.pp_schedule=interleaved1f1b", "parallel.microbatches=2"], 2,
     "schedule interleaved1f1b needs virtual_stages > 1"),
    (["parallel.dp=2", "parallel.tp=2", "parallel.dp_mode=ddp"], 4, "parallel.dp_mode: ddp cannot wrap tensor-parallel"),
    (["parallel.pp=4", "parallel.pp_split=cost", "model.n_layers=3", "parallel.microbatches=4"], 4,
     "model.n_layers: 3 layers cannot fill pp*virtual_stages = 4 stages"),
]


@pytest.mark.parametrize("overrides,world,message", BAD_LAYOUTS)
def test_bad_layout_is_one_line_error(overrides, world, message):
    from meshweave.train.config import load_config
    from meshweave.train.validate import validate

    problems = validate(load_config(None, overrides), world)
    assert len(problems) == 1 and "\n" not in problems[0]
    assert message in problems[0]


@pytest.mark.parametrize("overrides,world,message", [BAD_LAYOUTS[0], BAD_LAYOUTS[4], BAD_LAYOUTS[5]])
def test_cli_plan_rejects_bad_layout_with_exit_2(overrides, world, message):
    import subprocess
    import sys

    args = ["plan", "--world-size", str(world)] + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run([sys.executable, "-m", "meshweave", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cli_plan_shows_stages_peers_and_bubble():
    import subprocess
    import sys

    args = ["plan", "--world-size", "8", "--set", "parallel.dp=2", "--set", "parallel.tp=2", "--set", "parallel.pp=2",
            "--set", "parallel.pp_schedule=interleaved1f1b", "--set", "parallel.virtual_stages=2",
            "--set", "parallel.microbatches=4", "--set", "train.global_batch=16"]
    proc = subprocess.run([sys.executable, "-m", "meshweave", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "ideal bubble fraction 0.111" in out  # (p-1)/(v*m+p-1) = 1/9
    assert "pp rank 1: stage 1 = layers 1-1, stage 3 = layers 3-3" in out
    row5 = next(line.split() for line in out.splitlines() if line.split()[:1] == ["5"])
    assert row5[1:5] == ["1", "0", "0", "1"] and row5[5] == "1-1+3-3"  # pp dp sp tp, layers of both chunks
    assert row5[6] == "5,7" and row5[8] == "4,5"  # dp peers, tp peers


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    layout(2, 2, 1, "parallel.dp_mode=fsdp", "train.dtype=bfloat16"),
    layout(2, 1, 2, "parallel.dp_mode=fsdp", "parallel.microbatches=2", "train.dtype=bfloat16"),
], ids=["dp2-tp2-fsdp-bf16", "dp2-pp2-fsdp-bf16"])
def test_bf16_compute_tracks_fp32(overrides, reference):
    """bf16 compute (FSDP2 mixed precision: bf16 params in compute, bf16 activations across stages)
    with fp32 master weights: losses within bf16 rounding (~3 significant digits) of fp32."""
    results = run_distributed(train_and_collect, 4, overrides)
    for res in results:
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(reference["losses"]), rtol=2e-2, atol=0)
        assert all(p.dtype == torch.float32 for p in res["params"].values())
        assert res["losses"] != reference["losses"]  # bf16 really was used
