"""Numeric ranges declared beside each schema field; absurd sizes that must not hang or exhaust memory.

Range cases run in-process (load_config + check raise one-line ConfigErrors); the command-line cases
run the CLI as a subprocess and check the exit status and the single stderr line.
"""

import dataclasses
import subprocess
import sys
import time
import typing

import pytest

from meshweave.core.config import range_problems
from meshweave.core.schema import INT_LIMIT, Config, Range
from meshweave.launch.plan import render_plan
from meshweave.models.llama.config import LlamaConfig
from meshweave.train.build import parallel_dims
from meshweave.train.config import ConfigError, load_config
from meshweave.train.validate import check, resolve_defaults, validate

# (overrides, expected fragment of the one-line message); every case is invalid for world size 2.
OUT_OF_RANGE = [
    (["train.lr=.nan"], "train.lr: nan is not a finite number; use a value > 0"),
    (["train.lr=.inf"], "train.lr: inf is not a finite number"),
    (["train.lr=-.inf"], "train.lr: -inf is not a finite number"),
    (["train.lr=1e999"], "train.lr: inf is not a finite number"),  # YAML 1.1 reads it as a string; float() overflows
    (["train.lr=0"], "train.lr: 0.0 must be > 0"),
    (["train.grad_clip=-1"], "train.grad_clip: -1.0 must be >= 0"),
    (["train.grad_clip=.nan"], "train.grad_clip: nan is not a finite number"),
    (["train.weight_decay=-0.1"], "train.weight_decay: -0.1 must be >= 0"),
    (["train.beta1=1"], "train.beta1: 1.0 must be in [0, 1)"),
    (["train.beta1=-0.5"], "train.beta1: -0.5 must be in [0, 1)"),
    (["train.beta2=1.0"], "train.beta2: 1.0 must be in [0, 1)"),
    (["train.beta2=2"], "train.beta2: 2.0 must be in [0, 1)"),
    (["train.min_lr_ratio=1.5"], "train.min_lr_ratio: 1.5 must be in [0, 1]"),
    (["train.min_lr_ratio=-0.1"], "train.min_lr_ratio: -0.1 must be in [0, 1]"),
    (["train.steps=0"], "train.steps: 0 must be >= 1"),
    (["train.steps=-5"], "train.steps: -5 must be >= 1"),
    (["train.seq_len=1"], "train.seq_len: 1 must be >= 2"),
    (["train.seq_len=0"], "train.seq_len: 0 must be >= 2"),
    (["train.global_batch=0"], "train.global_batch: 0 must be >= 1"),
    (["train.grad_accum=0"], "train.grad_accum: 0 must be >= 1"),
    (["train.warmup_steps=-1"], "train.warmup_steps: -1 must be >= 0"),
    (["train.nproc=0"], "train.nproc: 0 must be >= 1"),
    (["train.nproc=-2"], "train.nproc: -2 must be >= 1"),
    (["train.peak_tflops=0"], "train.peak_tflops: 0.0 must be > 0"),
    (["train.peak_tflops=-3"], "train.peak_tflops: -3.0 must be > 0"),
    (["train.seed=-1"], "train.seed: -1 must be >= 0"),
    (["train.seed=99999999999999999999"], "train.seed: 99999999999999999999 does not fit a 64-bit integer"),
    (["model.rope_theta=0"], "model.rope_theta: 0.0 must be > 0"),
    (["model.rope_theta=.inf"], "model.rope_theta: inf is not a finite number"),
    (["model.norm_eps=0"], "model.norm_eps: 0.0 must be > 0"),
    (["model.init_std=-0.02"], "model.init_std: -0.02 must be > 0"),
    (["model.vocab_size=0"], "model.vocab_size: 0 must be >= 1"),
    (["model.dim=-256"], "model.dim: -256 must be >= 1"),
    (["model.n_layers=0"], "model.n_layers: 0 must be >= 1"),
    (["model.n_heads=0"], "model.n_heads: 0 must be >= 1"),
    (["model.n_kv_heads=0"], "model.n_kv_heads: 0 must be >= 1"),
    (["model.ffn_hidden=0"], "model.ffn_hidden: 0 must be >= 1"),
    (["data.max_bytes=0"], "data.max_bytes: 0 must be >= 1"),
    (["data.max_bytes=-100"], "data.max_bytes: -100 must be >= 1"),
    (["data.synthetic_mean_len=0"], "data.synthetic_mean_len: 0 must be >= 1"),
    (["data.synthetic_max_len=-4"], "data.synthetic_max_len: -4 must be >= 2"),
    (["checkpoint.keep=-1"], "checkpoint.keep: -1 must be >= 1"),
    (["checkpoint.every_steps=-10"], "checkpoint.every_steps: -10 must be >= 0"),
    (["logging.every_steps=0"], "logging.every_steps: 0 must be >= 1"),
    (["parallel.dp=-2"], "parallel.dp: -2 must be >= 1, or -1 to fill the world size"),
    (["parallel.sp=0"], "parallel.sp: 0 must be >= 1"),
    (["parallel.microbatches=-1"], "parallel.microbatches: -1 must be >= 1, or 0 (picked automatically)"),
    (["parallel.virtual_stages=0"], "parallel.virtual_stages: 0 must be >= 1"),
    (["parallel.usp.ulysses=-1"], "parallel.usp.ulysses: -1 must be >= 1, or 0 (picked automatically)"),
    (["parallel.usp.ring=-2"], "parallel.usp.ring: -2 must be >= 1, or 0"),
]


@pytest.mark.parametrize("overrides,expected", OUT_OF_RANGE, ids=[c[0][0] for c in OUT_OF_RANGE])
def test_out_of_range_value_is_one_line_naming_field_value_and_range(overrides, expected):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as info:
        check(cfg, 2)
    message = str(info.value)
    assert expected in message and "\n" not in message and len(message) < 300


@pytest.mark.parametrize("overrides", [
    ["parallel.dp=-1"],  # fill the world size
    ["parallel.pp=2", "parallel.microbatches=0"],  # picked to fit
    ["parallel.sp=2", "parallel.sp_method=usp", "parallel.usp.ulysses=0", "parallel.usp.ring=0"],  # picked
    ["train.grad_clip=0", "train.weight_decay=0", "train.beta1=0", "train.min_lr_ratio=1", "train.warmup_steps=0"],
    ["checkpoint.every_steps=0", "train.seed=0", "train.seq_len=2"],
])
def test_boundary_and_special_values_are_legal(overrides):
    assert validate(load_config(None, overrides), 2) == []


def _numeric_fields(cls: type, prefix: str = ""):
    for name, tp in typing.get_type_hints(cls, include_extras=True).items():
        bare = typing.get_type_hints(cls)[name]
        if dataclasses.is_dataclass(bare):
            yield from _numeric_fields(bare, f"{prefix}{name}.")
            continue
        args = [a for a in typing.get_args(bare) if a is not type(None)] or [bare]
        if args[0] in (int, float) and name != "version":
            yield f"{prefix}{name}", tp


@pytest.mark.parametrize("cls", [Config, LlamaConfig])
def test_every_numeric_field_declares_its_range_beside_it(cls):
    for name, tp in _numeric_fields(cls):
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
        declared = [m for a in inner if typing.get_origin(a) is typing.Annotated for m in a.__metadata__]
        assert any(isinstance(m, Range) for m in declared), f"{name} has no Range"


def test_range_descriptions():
    assert Range(ge=1).describe() == ">= 1"
    assert Range(gt=0).describe() == "> 0"
    assert Range(ge=0, lt=1).describe() == "in [0, 1)"
    assert Range(ge=1, also=(-1,), meaning="to fill the world size").describe() == ">= 1, or -1 to fill the world size"
    assert Range(gt=0).accepts(1e-9) and not Range(gt=0).accepts(float("inf")) and not Range(ge=0).accepts(float("nan"))


def test_defaults_and_all_shipped_values_are_in_range():
    assert range_problems(load_config(None)) == []


def test_a_huge_value_is_quoted_by_a_bounded_prefix():
    cfg = load_config(None, [f"model.dim={10 ** 400}"])
    with pytest.raises(ConfigError) as info:
        check(cfg, 2)
    message = str(info.value)
    assert message.startswith("model.dim: 1000000000") and "401 characters" in message and len(message) < 300
    with pytest.raises(ConfigError, match="too large for a floating-point number"):
        load_config(None, [f"train.lr={10 ** 400}"])
    assert 2 ** 63 - 1 == INT_LIMIT


def test_a_long_unknown_key_is_quoted_by_a_bounded_prefix():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["train." + "x" * 5000 + "=1"])
    assert "5000 characters" in str(info.value) and len(str(info.value)) < 400


# --- sizes that must not hang or exhaust memory ------------------------------------------------
def test_plan_of_ten_million_layers_is_immediate():
    cfg = resolve_defaults(load_config(None, ["model.n_layers=10000000", "parallel.pp=8", "train.global_batch=8",
                                              "parallel.microbatches=8"]), 8)
    start = time.perf_counter()
    text = render_plan(cfg, parallel_dims(cfg, 8))
    assert time.perf_counter() - start < 5
    assert "8750000-9999999" in text  # the last stage's layers, as a range


def test_cost_split_too_large_to_plan_is_refused():
    cfg = load_config(None, ["model.n_layers=4000", "parallel.pp=4", "parallel.pp_split=cost"])
    with pytest.raises(ConfigError, match="parallel.pp_split: balancing 4000 layers over 4 stages by cost is too large"):
        check(cfg, 4)


def test_sequence_parallel_larger_than_the_sequence_is_refused_without_searching():
    cfg = load_config(None, ["parallel.sp=1048576", "parallel.sp_method=ulysses"])
    with pytest.raises(ConfigError, match="parallel.sp: 1048576 ranks cannot share a sequence"):
        check(cfg, 1048576)


def test_microbatch_default_for_a_huge_batch_is_found_without_scanning_it():
    cfg = load_config(None, ["parallel.pp=2", "train.global_batch=999999999989"])  # a prime: only itself divides it
    start = time.perf_counter()
    resolved = resolve_defaults(cfg, 2)
    assert time.perf_counter() - start < 5 and resolved.parallel.microbatches == 999_999_999_989


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "meshweave", *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def test_plan_for_a_billion_ranks_lists_a_bounded_table():
    proc = _cli("plan", "--world-size", "1000000000", "--set", "train.global_batch=1000000000")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) < 100 and "999,999,935 more ranks not listed" in proc.stdout
    assert lines[-3].split()[0] == "999999999"  # the last rank's row


@pytest.mark.parametrize("args,expected", [
    (["plan", "--world-size", "0"], "config error: --world-size: 0 must be >= 1"),
    (["plan", "--world-size", "-8"], "config error: --world-size: -8 must be >= 1"),
    (["plan", "--world-size", str(10 ** 30)], "must be >= 1 and below 2**63"),
    (["plan", "--world-size", "lots"], "usage error: argument --world-size: invalid int value: 'lots'"),
    (["train", "--nproc", "0"], "config error: --nproc: 0 must be >= 1"),
    (["train", "--nproc", "-4"], "config error: --nproc: -4 must be >= 1"),
    (["train", "--set", "train.lr=.nan"], "config error: train.lr: nan is not a finite number"),
    (["config", "--set", "model.rope_theta=0"], "config error: model.rope_theta: 0.0 must be > 0"),
    (["train", "--set", "model.n_layers=10000000"], "config error: memory: 2 rank(s) on this machine need about"),
])
def test_cli_refuses_bad_numbers_with_one_line_and_exit_2(args, expected):
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
