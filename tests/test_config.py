"""Config loading, overrides and the validation corpus: every bad config gives one line, exit 2, no traceback."""

import subprocess
import sys
import textwrap

import pytest

from meshweave.train.config import ConfigError, load_config
from meshweave.core.schema import Config
from meshweave.train.validate import check, validate

# (overrides, world size, expected fragment of the one-line message)
BAD_CONFIGS = [
    (["parallel.dp=2", "parallel.tp=2", "parallel.sp=4"], 8, "dp*tp*pp*sp = 2*2*1*4 = 16, but WORLD_SIZE is 8"),
    (["parallel.tp=3"], 8, "tp*pp*sp = 3*1*1 = 3 does not divide WORLD_SIZE 8"),
    (["parallel.tp=0"], 2, "parallel.tp: 0 must be >= 1"),
    (["parallel.dp=0"], 2, "parallel.dp: 0 must be >= 1, or -1"),
    (["parallel.tp=4", "model.n_heads=6", "model.n_kv_heads=3", "model.dim=384"], 4, "model.n_heads 6 is not divisible by tp 4"),
    (["parallel.tp=4", "model.n_kv_heads=2"], 4, "model.n_kv_heads 2 is not divisible by tp 4"),
    (["model.dim=250"], 2, "dim 250 is not divisible by n_heads 8"),
    (["model.n_kv_heads=3"], 2, "n_heads 8 is not divisible by n_kv_heads 3"),
    (["model.vocab_size=200"], 2, "model.vocab_size: 200 is smaller than the byte tokenizer's 259"),
    (["parallel.pp=2", "model.n_layers=3", "parallel.microbatches=2"], 2, "3 layers do not split evenly into pp*virtual_stages = 2"),
    (["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.microbatches=1"], 2, "1f1b needs microbatches >= pp"),
    (["parallel.pp=2", "parallel.pp_schedule=pipedream"], 2, "parallel.pp_schedule: 'pipedream' is not available; choose one of"),
    (["parallel.sp=2", "train.seq_len=250"], 2, "train.seq_len"),
    (["train.global_batch=3"], 2, "train.global_batch: 3 is not divisible by the data-parallel degree 2"),
    (["train.grad_accum=3"], 2, "train.grad_accum: the per-rank batch 4"),
    (["train.steps=0"], 2, "train.steps: 0 must be >= 1"),
    (["train.lr=-1"], 2, "train.lr: -1.0 must be > 0"),
    (["train.warmup_steps=100", "train.steps=10"], 2, "train.warmup_steps: 100 must be between 0 and train.steps (10)"),
    (["data.source=path", "data.path=/no/such/corpus"], 2, "data.path: '/no/such/corpus' does not exist"),
    (["run_dir=/etc/hostname/run"], 2, "run_dir: '/etc/hostname/run' is not writable"),
    (["logging.every_steps=0"], 2, "logging.every_steps: 0 must be >= 1"),
]

# Errors found while reading the config itself (before validation against a world size).
BAD_READS = [
    (["parallel.pp_schedul=1f1b"], "parallel.pp_schedul: unknown key 'pp_schedul'; did you mean 'pp_schedule'?"),
    (["paralel.dp=2"], "paralel: unknown key 'paralel'; did you mean 'parallel'?"),
    (["train.steps=many"], "train.steps: expected int, got 'many'"),
    (["parallel.activation_checkpointing=3"], "parallel.activation_checkpointing: expected bool, got 3"),
    (["checkpoint.levels=local"], "checkpoint.levels: expected a list"),
    (["version=2"], "version: 2 is not supported"),
    (["train.steps"], "expected KEY=VALUE"),
    # enum-like fields are Literal-typed and checked while reading
    (["parallel.dp_mode=zero3"], "parallel.dp_mode: 'zero3' is not one of fsdp, ddp"),
    (["parallel.sp=2", "parallel.sp_method=striped"], "parallel.sp_method: 'striped' is not one of"),
    (["train.dtype=fp8"], "train.dtype: 'fp8' is not one of auto, float32, bfloat16"),
    (["data.source=web"], "data.source: 'web' is not one of builtin, path, synthetic"),
]


@pytest.mark.parametrize("overrides,world,expected", BAD_CONFIGS, ids=[c[2][:40] for c in BAD_CONFIGS])
def test_bad_config_gives_one_line_naming_the_problem(overrides, world, expected):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as info:
        check(cfg, world)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


@pytest.mark.parametrize("overrides,expected", BAD_READS, ids=[c[1][:40] for c in BAD_READS])
def test_bad_keys_and_types_rejected_while_reading(overrides, expected):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_default_config_is_valid_for_its_own_process_count():
    cfg = load_config()
    assert validate(cfg, cfg.train.nproc) == []


def test_yaml_file_and_dotted_overrides_with_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent("""
        version: 1
        model: {dim: 128, n_heads: 4, n_kv_heads: 2}
        parallel: {dp: 2, dp_mode: ddp}
        train: {steps: 7, lr: 1e-3}
        checkpoint: {levels: [memory, local]}
    """))
    cfg = load_config(path, ["parallel.dp=4", "train.lr=2e-4", "train.peak_tflops=100", "data.path=null",
                             "parallel.usp.ulysses=2"])
    assert isinstance(cfg, Config)
    assert (cfg.model.dim, cfg.model.n_heads, cfg.model.n_layers) == (128, 4, 4)  # untouched fields keep defaults
    assert cfg.parallel.dp == 4 and cfg.parallel.dp_mode == "ddp"
    assert cfg.train.steps == 7 and cfg.train.lr == pytest.approx(2e-4)
    assert isinstance(cfg.train.peak_tflops, float) and cfg.train.peak_tflops == 100.0
    assert cfg.checkpoint.levels == ["memory", "local"] and cfg.parallel.usp.ulysses == 2


def test_not_yaml_and_missing_file_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {dim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


@pytest.mark.parametrize("args,expected", [
    (["plan", "--world-size", "8", "--set", "parallel.dp=2", "--set", "parallel.tp=2", "--set", "parallel.sp=4"],
     "config error: parallel: dp*tp*pp*sp = 2*2*1*4 = 16, but WORLD_SIZE is 8"),
    (["train", "--set", "parallel.micro_batches=2"], "did you mean 'microbatches'?"),
    (["train", "--nproc", "3"], "train.global_batch: 8 is not divisible by the data-parallel degree 3"),
    (["config", "/no/such.yaml"], "does not exist"),
])
def test_cli_exits_2_with_one_line_and_no_traceback(args, expected):
    proc = subprocess.run([sys.executable, "-m", "meshweave", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_shortening_a_run_needs_no_other_change():
    """`--set train.steps=4` alone must be a valid run: warm-up defaults to 10% of the steps."""
    cfg = load_config(None, ["train.steps=4"])
    assert validate(cfg, 2) == [] and cfg.train.warmup == 0
    assert load_config(None).train.warmup == 20
