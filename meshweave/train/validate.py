"""Up-front validation of a whole config against a world size: one line per problem, naming field and fix.

Runs before any process starts and imports no torch. `resolve_defaults(cfg, world_size)` fills the
values left to meshweave (pipeline microbatches, USP degrees); `validate(cfg, world_size)` returns
the problems of the first failing rule group; `check(cfg, world_size)` raises a ConfigError with the
first one (a `PathError`, its subclass, when the config names paths this machine cannot use). The
numeric ranges are declared beside each field (core/schema.py, the model kinds' configs) and checked
first; the model's own rules come from its spec; the layout's from `ParallelDims`. No rule iterates
over ranks, layers or batch rows without a bound, so an absurd size is an error, never a hang.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path

from meshweave.attention.validate import max_ulysses_degree, validate_sp
from meshweave.checkpoint.settings import validate_checkpoint_settings
from meshweave.core.config import _short, range_problems
from meshweave.core.dims import layout_problems, resolved_dp
from meshweave.core.errors import ConfigError
from meshweave.core.schema import Config, UspConfig
from meshweave.data.tokenizer import BYTE_VOCAB_SIZE
from meshweave.models.registry import model_spec
from meshweave.models.spec import ParallelLayout, slot_kinds
from meshweave.parallel.schedules import SCHEDULE_CLASSES, is_multi_stage, stage_style
from meshweave.train.validate_adaptive import adaptive_problems

# Largest cost-balanced pipeline split planned (stages * layers^2 steps of its dynamic programme).
COST_SPLIT_BUDGET = 20_000_000
# Pipeline microbatch counts tried above pp when picking one (the per-rank batch itself always fits).
MICROBATCH_SEARCH = 100_000


class PathError(ConfigError):
    """The config names a path this machine cannot use (missing data, a directory it cannot write).
    Reported like any config error, before any process starts; the CLI exits with 3 (data/filesystem)."""


Rule = Callable[[Config, int], list[str]]


def check(cfg: Config, world_size: int) -> None:
    problems, rule = _first_problems(cfg, world_size)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise (PathError if rule in (_data, _paths) else ConfigError)(problems[0] + more)


def validate(cfg: Config, world_size: int) -> list[str]:
    """Problems of the first failing rule group (later rules assume the earlier ones hold)."""
    return _first_problems(cfg, world_size)[0]


def _first_problems(cfg: Config, world_size: int) -> tuple[list[str], Rule | None]:
    problems = range_problems(cfg) or layout_problems(cfg.parallel, world_size)
    if problems:
        return problems, None
    cfg = resolve_defaults(cfg, world_size)
    for rule in (_model, adaptive_problems, _tensor_parallel, _pipeline, _sequence_parallel, _batch, _train, _data,
                 _checkpoint, _paths):
        problems = rule(cfg, world_size)
        if problems:
            return problems, rule
    return [], None


def resolve_defaults(cfg: Config, world_size: int) -> Config:
    """A copy of `cfg` with the values left to meshweave filled in (what `plan` shows and workers run):
    pipeline microbatches (0 = the fewest that fit the schedule and divide the per-rank batch) and the USP
    degrees (0 = the largest Ulysses degree the heads allow, a ring over the rest)."""
    p = cfg.parallel
    microbatches = p.microbatches if p.microbatches else _default_microbatches(cfg, world_size)
    parallel = dataclasses.replace(p, microbatches=microbatches, usp=_default_usp(cfg))
    return dataclasses.replace(cfg, parallel=parallel)


def _default_microbatches(cfg: Config, world: int) -> int:
    p = cfg.parallel
    if p.pp == 1:
        return 1
    local = max(1, cfg.train.global_batch // max(1, resolved_dp(p, world)))
    search = range(p.pp, min(local, p.pp + MICROBATCH_SEARCH) + 1)  # bounded: local itself always divides
    return next((m for m in search if local % m == 0), local)


def _default_usp(cfg: Config) -> UspConfig:
    p = cfg.parallel
    if p.sp_method != "usp" or p.sp < 1:
        return p.usp
    heads, kv_heads = model_spec(cfg.model.kind).attention_heads(cfg.model)
    ulysses = p.usp.ulysses
    if ulysses == 0:
        tp = p.tp if p.tp >= 1 and heads % p.tp == 0 and kv_heads % p.tp == 0 else 1
        # A Ulysses degree divides both sp and the heads: searching the divisors of their gcd finds the same
        # degree as searching sp's, in at most n_heads steps however large sp is.
        ulysses = max_ulysses_degree(heads // tp, kv_heads // tp, math.gcd(p.sp, heads // tp))
    ring = p.usp.ring or (p.sp // ulysses if ulysses > 0 and p.sp % ulysses == 0 else 0)
    return dataclasses.replace(p.usp, ulysses=ulysses, ring=ring)


def _model(cfg: Config, world: int) -> list[str]:
    m, p = cfg.model, cfg.parallel
    problems = model_spec(m.kind).validate(m, ParallelLayout(p.tp, p.sp, p.sp_method, cfg.train.seq_len, p.pp))
    if problems:
        return problems
    vocab = getattr(m, "vocab_size", None)
    if vocab is not None and cfg.data.source != "synthetic" and vocab < BYTE_VOCAB_SIZE:
        return [f"model.vocab_size: {vocab} is smaller than the byte tokenizer's {BYTE_VOCAB_SIZE} "
                f"tokens; use at least {BYTE_VOCAB_SIZE} (320 keeps it divisible by common tp degrees)"]
    return []


def _tensor_parallel(cfg: Config, world: int) -> list[str]:
    tp = cfg.parallel.tp
    if tp == 1:
        return []
    # Factorised models (st_dit) keep their activations whole over tp (no sequence-parallel norms) and count no
    # train.seq_len tokens: their own validate checks what tp splits (the heads).
    text = model_spec(cfg.model.kind).factorised_dims is None
    if text and cfg.train.seq_len % (tp * cfg.parallel.sp):
        return [f"train.seq_len: {cfg.train.seq_len} is not divisible by parallel.tp*sp = {tp * cfg.parallel.sp} "
                f"(sequence-parallel norms shard each rank's tokens over tp)"]
    if cfg.parallel.dp_mode == "ddp" and resolved_dp(cfg.parallel, world) * cfg.parallel.sp > 1:
        return ["parallel.dp_mode: ddp cannot wrap tensor-parallel (DTensor) parameters; use dp_mode: fsdp with tp > 1"]
    return []


def _pipeline(cfg: Config, world: int) -> list[str]:
    p, layers = cfg.parallel, cfg.model.n_layers
    if p.pp == 1:
        return []
    names = list(SCHEDULE_CLASSES)
    if p.pp_schedule not in names:
        return [f"parallel.pp_schedule: {_short(p.pp_schedule)} is not available; choose one of {', '.join(names)}"]
    if p.virtual_stages < 1:
        return [f"parallel.virtual_stages: {p.virtual_stages} must be >= 1"]
    if is_multi_stage(p.pp_schedule) != (p.virtual_stages > 1):
        need = "> 1" if is_multi_stage(p.pp_schedule) else "== 1"
        return [f"parallel.virtual_stages: schedule {p.pp_schedule} needs virtual_stages {need}, got {p.virtual_stages}"]
    if stage_style(p.pp_schedule) == "v" and p.virtual_stages != 2:
        return [f"parallel.virtual_stages: schedule {p.pp_schedule} places exactly 2 stages per rank (V shape); "
                f"set virtual_stages: 2"]
    stages = p.pp * p.virtual_stages
    if p.pp_split == "cost" and stages * layers ** 2 > COST_SPLIT_BUDGET:
        return [f"parallel.pp_split: balancing {layers} layers over {stages} stages by cost is too large to plan "
                f"(stages*layers^2 = {stages * layers ** 2:.3g} > {COST_SPLIT_BUDGET:.0e}); use pp_split: even"]
    if p.pp_split == "even" and layers % stages:
        return [f"model.n_layers: {layers} layers do not split evenly into pp*virtual_stages = {stages} stages; "
                f"change n_layers, pp or virtual_stages, or set parallel.pp_split: cost"]
    if layers < stages:
        return [f"model.n_layers: {layers} layers cannot fill pp*virtual_stages = {stages} stages (one layer each at least)"]
    if p.microbatches < p.pp and p.pp_schedule != "gpipe":
        return [f"parallel.microbatches: {p.pp_schedule} needs microbatches >= pp ({p.microbatches} < {p.pp}); "
                f"raise microbatches to at least {p.pp}"]
    return []


def _sequence_parallel(cfg: Config, world: int) -> list[str]:
    p, seq = cfg.parallel, cfg.train.seq_len
    if p.sp == 1:
        return []
    if p.sp_method == "dsp":
        return _dynamic_sequence_parallel(cfg)
    if model_spec(cfg.model.kind).factorised_dims is not None:
        return []  # the model's own validate allowed the method (its ulysses pads the heads)
    if p.sp > seq:
        return [f"parallel.sp: {p.sp} ranks cannot share a sequence of train.seq_len {seq} tokens; use sp <= seq_len"]
    spec = model_spec(cfg.model.kind)
    heads, kv_heads = spec.attention_heads(cfg.model)
    split_heads = "softmax" in slot_kinds(spec, cfg.model)  # LASP-2 (linear layers) splits no heads
    if p.sp_method == "ulysses" and split_heads and p.sp > heads // p.tp:
        return [f"parallel.sp: ulysses splits the attention heads over sp, but sp {p.sp} > the {heads // p.tp} heads per "
                f"tensor-parallel rank; use sp_method: ring or usp"]
    if p.sp_method == "usp" and p.usp.ulysses * p.usp.ring != p.sp:
        return [f"parallel.usp: ulysses*ring = {p.usp.ulysses}*{p.usp.ring} = {p.usp.ulysses * p.usp.ring} must equal "
                f"parallel.sp ({p.sp}); e.g. usp: {{ulysses: 2, ring: {max(1, p.sp // 2)}}}"]
    usp = p.usp.ulysses if p.sp_method == "usp" else None
    return validate_sp(p.sp_method, heads // p.tp, kv_heads // p.tp, p.sp, seq, usp, split_heads)


def _dynamic_sequence_parallel(cfg: Config) -> list[str]:
    """DSP needs factorised attention (each block over one dim of multi-dimensional activations); it splits no
    heads and pads dims that do not divide by sp, so nothing else constrains it."""
    if model_spec(cfg.model.kind).factorised_dims is None:
        return [f"parallel.sp_method: dsp shards the dims of factorised (spatial/temporal) attention, which model kind "
                f"{cfg.model.kind} does not have; use sp_method: ring or ulysses, or model.kind: st_dit"]
    return []


def _batch(cfg: Config, world: int) -> list[str]:
    t, p = cfg.train, cfg.parallel
    if p.adaptive.enabled:
        return []  # a step is data.tokens_per_step of whole documents; global_batch does not apply
    dp = max(1, resolved_dp(p, world))
    if t.global_batch < 1 or t.grad_accum < 1 or p.microbatches < 1:
        return ["train.global_batch, train.grad_accum and parallel.microbatches must be >= 1"]
    if t.global_batch % dp:
        return [f"train.global_batch: {t.global_batch} is not divisible by the data-parallel degree {dp}"]
    local = t.global_batch // dp
    if p.pp > 1 and t.grad_accum != 1:
        return ["train.grad_accum: with pp > 1 set parallel.microbatches instead (the schedule accumulates)"]
    split = p.microbatches if p.pp > 1 else t.grad_accum
    field = "parallel.microbatches" if p.pp > 1 else "train.grad_accum"
    if local % split:
        return [f"{field}: the per-rank batch {local} (global_batch {t.global_batch} / dp {dp}) is not divisible "
                f"by {split}"]
    return []


def _train(cfg: Config, world: int) -> list[str]:
    t = cfg.train  # the ranges of single fields (steps >= 1, lr > 0, ...) are checked first, from the schema
    if t.warmup_steps is not None and not 0 <= t.warmup_steps <= t.steps:
        return [f"train.warmup_steps: {t.warmup_steps} must be between 0 and train.steps ({t.steps})"]
    if t.device == "cuda" and not _cuda_available():
        return ["train.device: cuda was asked for but no CUDA device is visible; use device: auto or cpu"]
    return []


def _data(cfg: Config, world: int) -> list[str]:
    d = cfg.data
    if d.source == "path" and (d.path is None or not Path(d.path).exists()):
        return [f"data.path: {_short(d.path)} does not exist; give a text file or a directory of .txt/.md/.py files"]
    return []


def _checkpoint(cfg: Config, world: int) -> list[str]:
    if cfg.checkpoint.dir is None:
        return []
    return validate_checkpoint_settings(cfg.checkpoint)


def _paths(cfg: Config, world: int) -> list[str]:
    problems = []
    for field, value in (("run_dir", cfg.run_dir), ("checkpoint.dir", cfg.checkpoint.dir),
                         ("checkpoint.persistent_dir", cfg.checkpoint.persistent_dir)):
        if value is not None and not _writable(Path(value)):
            problems.append(f"{field}: {_short(value)} is not writable; choose a directory you can write to")
    return problems


def _writable(path: Path) -> bool:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _cuda_available() -> bool:
    import torch  # only when the config asks for CUDA: validation stays torch-free otherwise

    return torch.cuda.is_available()
