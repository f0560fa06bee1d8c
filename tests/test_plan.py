"""`meshweave plan` describes a 64-rank layout without starting any process."""

import subprocess
import sys

import pytest

from meshweave.core.mesh import ParallelDims
from meshweave.launch.plan import bubble_fraction, render_plan
from meshweave.train.build import parallel_dims
from meshweave.train.config import load_config


def test_rank_layout_groups_partition_the_world():
    dims = ParallelDims(pp=2, dp=4, sp=2, tp=4)
    for axes in (("pp",), ("dp",), ("sp",), ("tp",), ("dp", "sp")):
        groups = dims.groups(axes)
        assert sorted(r for g in groups for r in g) == list(range(64))
        size = 1
        for a in axes:
            size *= getattr(dims, a)
        assert all(len(g) == size for g in groups)
    assert dims.groups(("tp",))[0] == [0, 1, 2, 3]  # tp innermost: neighbours
    assert dims.coordinate(37) == {"pp": 1, "dp": 0, "sp": 1, "tp": 1}
    assert dims.rank_of(pp=1, dp=0, sp=1, tp=1) == 37


def test_plan_for_64_ranks_via_cli():
    args = ["plan", "--world-size", "64", "--set", "parallel.tp=4", "--set", "parallel.pp=2",
            "--set", "parallel.sp=2", "--set", "parallel.microbatches=4", "--set", "train.global_batch=32",
            "--set", "train.seq_len=1024"]
    proc = subprocess.run([sys.executable, "-m", "meshweave", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "mesh (pp, dp, sp, tp) = (2, 4, 2, 4) over 64 ranks" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and len(line.split()) >= 9]
    assert [int(r[0]) for r in rows] == list(range(64))
    row37 = rows[37]
    assert row37[1:5] == ["1", "0", "1", "1"]  # pp dp sp tp of rank 37
    assert row37[5] == "2-3"  # layers of stage 1 of 4 layers on 2 stages
    assert row37[8] == "36,37,38,39"  # its tensor-parallel peers
    assert "bubble fraction 0.200" in out  # 1F1B, p=2, m=4: (p-1)/(m+p-1)
    assert "memory per rank" in out and "parameters" in out


def test_memory_estimate_shrinks_with_sharding():
    base = load_config(None, ["train.global_batch=8"])
    one = render_plan(base, parallel_dims(base, 1))
    sharded = load_config(None, ["train.global_batch=8", "parallel.tp=2"])
    two = render_plan(sharded, parallel_dims(sharded, 8))
    gib = lambda text: float(text.split("GiB weights")[0].split()[-1])  # noqa: E731
    assert gib(two) < gib(one) / 7  # tp=2 x fsdp over dp=4: about 8x less state


def test_bubble_fraction_formulas():
    assert bubble_fraction("1f1b", 4, 12, 1) == 3 / 15
    assert bubble_fraction("interleaved1f1b", 4, 12, 2) == 3 / 27
    assert bubble_fraction("gpipe", 1, 12, 1) == 0.0


def _meshweave(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "meshweave", *args], capture_output=True, text=True, timeout=60)


def test_pipeline_microbatches_are_picked_to_fit_and_plan_says_so():
    from meshweave.train.validate import resolve_defaults, validate

    cfg = load_config(None, ["parallel.pp=4", "train.global_batch=16"])  # microbatches left to meshweave
    assert cfg.parallel.microbatches == 0 and validate(cfg, 8) == []
    resolved = resolve_defaults(cfg, 8)  # dp 2: 8 rows per rank; the fewest >= pp that divide them: 4
    assert resolved.parallel.microbatches == 4
    assert resolve_defaults(load_config(None, ["parallel.pp=2", "train.global_batch=9"]), 2).parallel.microbatches == 3
    proc = _meshweave("plan", "--world-size", "8", "--set", "parallel.pp=4", "--set", "train.global_batch=16")
    assert proc.returncode == 0, proc.stderr
    assert "pipeline: 1f1b, 4 microbatches" in proc.stdout and "picked: parallel.microbatches: 4" in proc.stdout


def test_usp_degrees_are_picked_from_the_heads():
    from meshweave.train.validate import resolve_defaults, validate

    # 8 heads, 2 kv heads, sp 8: Ulysses may go up to 8 (kv heads replicate), the ring takes the rest
    cfg = load_config(None, ["parallel.sp=8", "parallel.sp_method=usp", "model.n_kv_heads=2"])
    assert validate(cfg, 8) == []
    assert (resolve_defaults(cfg, 8).parallel.usp.ulysses, resolve_defaults(cfg, 8).parallel.usp.ring) == (8, 1)
    # 6 heads (dim 384), sp 4: 4 does not divide 6, so Ulysses 2 x ring 2
    cfg = load_config(None, ["parallel.sp=4", "parallel.sp_method=usp", "model.dim=384", "model.n_heads=6",
                             "model.n_kv_heads=2", "train.seq_len=256"])
    usp = resolve_defaults(cfg, 4).parallel.usp
    assert (usp.ulysses, usp.ring) == (2, 2) and validate(cfg, 4) == []
    given = load_config(None, ["parallel.sp=4", "parallel.sp_method=usp", "parallel.usp.ulysses=1"])
    assert (resolve_defaults(given, 4).parallel.usp.ulysses, resolve_defaults(given, 4).parallel.usp.ring) == (1, 4)


def test_plan_and_config_do_not_import_torch():
    code = ("import sys; from meshweave.launch.cli import main; "
            "assert main(['plan', '--world-size', '8', '--set', 'parallel.tp=2', '--set', 'parallel.pp=2']) == 0; "
            "assert main(['config']) == 0; "
            "loaded = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not loaded, loaded")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_plan_into_a_closed_pipe_ends_quietly():
    proc = subprocess.run(f"{sys.executable} -m meshweave plan --world-size 64 --set train.global_batch=64 | head -n 1", shell=True,
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.startswith("mesh (pp, dp, sp, tp)") and proc.stderr == ""


@pytest.mark.parametrize("kind,method,ops", [
    ("llama", "ring", "softmax layers: ring"),
    ("linear_llama", "ulysses", "linear layers: LASP-2"),
    ("hybrid", "ring", "linear layers: LASP-2; softmax layers: ring"),
    ("hybrid", "allgather", "linear layers: LASP-2; softmax layers: LASP-2H (all-gather K/V)"),
])
def test_plan_names_the_op_of_each_layer_kind(kind, method, ops):
    cfg = load_config(None, [f"model.kind={kind}", "parallel.sp=2", f"parallel.sp_method={method}"])
    line = next(x for x in render_plan(cfg, parallel_dims(cfg, 2)).splitlines() if x.startswith("sequence parallel"))
    assert line.endswith(f"tokens per rank; {ops}"), line



def test_plan_splits_heads_under_ulysses_only_for_models_with_softmax_layers():
    layout = ["--world-size", "4", "--set", "model.dim=192", "--set", "model.n_heads=6", "--set", "model.n_kv_heads=6",
              "--set", "train.seq_len=64", "--set", "parallel.sp=4", "--set", "parallel.sp_method=ulysses"]
    linear = _meshweave("plan", "--set", "model.kind=linear_llama", *layout)
    assert linear.returncode == 0, linear.stderr
    hybrid = _meshweave("plan", "--set", "model.kind=hybrid", *layout)
    assert hybrid.returncode == 2 and hybrid.stdout == ""
    assert hybrid.stderr.strip().splitlines() == [("meshweave: config error: parallel.sp: ulysses needs model.n_heads (6) "
                                                   "divisible by sp (4); use sp_method: ring, or usp with ulysses <= 2")]


def test_plan_memory_of_a_video_model_counts_its_tokens_per_sample_not_seq_len():
    """st_dit's samples are frames x patches tokens (train.seq_len is not read): the activation estimate follows
    model.frames and ignores train.seq_len; the sequence-parallel line names generic Ulysses' op."""
    from meshweave.launch.plan import memory_per_rank

    def activations(*overrides: str) -> float:
        cfg = load_config(None, ["model.kind=st_dit", "parallel.sp=2", "parallel.sp_method=dsp", *overrides])
        return memory_per_rank(cfg, parallel_dims(cfg, 2), 0).activation_bytes

    base = activations("model.frames=8", "train.seq_len=64")
    assert activations("model.frames=8", "train.seq_len=4096") == base
    assert activations("model.frames=16", "train.seq_len=64") == pytest.approx(2 * base)
    cfg = load_config(None, ["model.kind=st_dit", "parallel.sp=2", "parallel.sp_method=ulysses"])
    line = next(x for x in render_plan(cfg, parallel_dims(cfg, 2)).splitlines() if x.startswith("sequence parallel"))
    assert "spatial layers: ulysses over the flattened tokens" in line, line


def test_plan_memory_tp_splits_text_activations_only_and_adaptive_counts_its_token_cap():
    """Sequence-parallel norms shard a text model's activations over tp; st_dit's stay whole over tp. Under
    sp: adaptive a rank holds at most parallel.adaptive.tokens_per_rank tokens per micro-batch."""
    from meshweave.launch.plan import memory_per_rank

    def activations(world: int, *overrides: str) -> float:
        cfg = load_config(None, list(overrides))
        return memory_per_rank(cfg, parallel_dims(cfg, world), 0).activation_bytes

    video = ["model.kind=st_dit", "parallel.dp=1"]
    assert activations(2, *video, "parallel.tp=2") == activations(1, *video)
    text = ["parallel.dp=1", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=4"]
    assert activations(2, *text, "parallel.tp=2") < activations(1, *text)
    adaptive = ["parallel.sp=adaptive", "data.packing=false", "data.max_len=1024"]
    assert activations(4, *adaptive, "parallel.adaptive.tokens_per_rank=512") == pytest.approx(
        activations(4, *adaptive, "parallel.adaptive.tokens_per_rank=256") * 2, rel=0.01)
