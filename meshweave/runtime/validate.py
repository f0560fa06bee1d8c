"""Up-front validation of a config against a world size: one line per problem, naming field and fix.

Runs before any process starts. `validate(cfg, world_size)` returns every problem found;
`check(cfg, world_size)` raises a ConfigError with the first one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from meshweave.parallel.schedules import available_schedules, is_multi_stage, stage_style
from meshweave.runtime.config import ConfigError
from meshweave.runtime.schema import Config
from meshweave.runtime.tokenizer import ByteTokenizer

SP_METHODS = ("ulysses", "ring", "tokenring", "usp")


def check(cfg: Config, world_size: int) -> None:
    problems = validate(cfg, world_size)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)


def validate(cfg: Config, world_size: int) -> list[str]:
    """Problems of the first failing rule group (later rules assume the earlier ones hold)."""
    for rule in (_degrees, _model, _tensor_parallel, _pipeline, _sequence_parallel, _batch, _train, _data,
                 _checkpoint, _paths):
        problems = rule(cfg, world_size)
        if problems:
            return problems
    return []


def resolved_dp(cfg: Config, world_size: int) -> int:
    p = cfg.parallel
    return p.dp if p.dp != -1 else world_size // max(1, p.tp * p.pp * p.sp)


def _degrees(cfg: Config, world: int) -> list[str]:
    p = cfg.parallel
    for name in ("tp", "pp", "sp"):
        if getattr(p, name) < 1:
            return [f"parallel.{name}: {getattr(p, name)} must be >= 1"]
    if p.dp == 0 or p.dp < -1:
        return [f"parallel.dp: {p.dp} must be >= 1, or -1 to fill the world size"]
    other = p.tp * p.pp * p.sp
    if p.dp == -1 and world % other:
        return [f"parallel: tp*pp*sp = {p.tp}*{p.pp}*{p.sp} = {other} does not divide WORLD_SIZE {world}; "
                f"choose degrees whose product divides it"]
    dp = resolved_dp(cfg, world)
    if dp * other != world:
        return [f"parallel: dp*tp*pp*sp = {dp}*{p.tp}*{p.pp}*{p.sp} = {dp * other}, but WORLD_SIZE is {world}; "
                f"make the product equal the number of processes (or set dp: -1)"]
    if p.dp_mode not in ("fsdp", "ddp"):
        return [f"parallel.dp_mode: {p.dp_mode!r} is not one of fsdp, ddp"]
    return []


def _model(cfg: Config, world: int) -> list[str]:
    m = cfg.model
    if min(m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_hidden, m.vocab_size) < 1:
        return ["model: dim, n_layers, n_heads, n_kv_heads, ffn_hidden and vocab_size must all be >= 1"]
    if m.dim % m.n_heads:
        return [f"model.n_heads: dim {m.dim} is not divisible by n_heads {m.n_heads}; pick n_heads dividing dim"]
    if m.head_dim % 2:
        return [f"model.n_heads: head dim {m.head_dim} (dim/n_heads) must be even for RoPE"]
    if m.n_heads % m.n_kv_heads:
        return [f"model.n_kv_heads: n_heads {m.n_heads} is not divisible by n_kv_heads {m.n_kv_heads} (grouped-query "
                f"attention needs whole groups)"]
    if cfg.data.source != "synthetic" and m.vocab_size < ByteTokenizer.vocab_size:
        return [f"model.vocab_size: {m.vocab_size} is smaller than the byte tokenizer's {ByteTokenizer.vocab_size} "
                f"tokens; use at least {ByteTokenizer.vocab_size} (320 keeps it divisible by common tp degrees)"]
    return []


def _tensor_parallel(cfg: Config, world: int) -> list[str]:
    m, tp = cfg.model, cfg.parallel.tp
    if tp == 1:
        return []
    if m.n_heads % tp:
        return [f"parallel.tp: model.n_heads {m.n_heads} is not divisible by tp {tp}; choose tp dividing n_heads"]
    if m.n_kv_heads % tp:
        return [f"parallel.tp: model.n_kv_heads {m.n_kv_heads} is not divisible by tp {tp}; use n_kv_heads a multiple "
                f"of tp (kv-head replication is not supported)"]
    if m.ffn_hidden % tp:
        return [f"parallel.tp: model.ffn_hidden {m.ffn_hidden} is not divisible by tp {tp}"]
    if m.vocab_size % tp:
        return [f"parallel.tp: model.vocab_size {m.vocab_size} is not divisible by tp {tp} (vocab-parallel "
                f"embedding and loss); pad vocab_size to a multiple of {tp}"]
    if cfg.train.seq_len % (tp * cfg.parallel.sp):
        return [f"train.seq_len: {cfg.train.seq_len} is not divisible by parallel.tp*sp = {tp * cfg.parallel.sp} "
                f"(sequence-parallel norms shard each rank's tokens over tp)"]
    if cfg.parallel.dp_mode == "ddp" and resolved_dp(cfg, world) * cfg.parallel.sp > 1:
        return ["parallel.dp_mode: ddp cannot wrap tensor-parallel (DTensor) parameters; use dp_mode: fsdp with tp > 1"]
    return []


def _pipeline(cfg: Config, world: int) -> list[str]:
    p, layers = cfg.parallel, cfg.model.n_layers
    if p.pp == 1:
        return []
    names = available_schedules()
    if p.pp_schedule not in names:
        return [f"parallel.pp_schedule: {p.pp_schedule!r} is not available; choose one of {', '.join(names)}"]
    if p.virtual_stages < 1:
        return [f"parallel.virtual_stages: {p.virtual_stages} must be >= 1"]
    if is_multi_stage(p.pp_schedule) != (p.virtual_stages > 1):
        need = "> 1" if is_multi_stage(p.pp_schedule) else "== 1"
        return [f"parallel.virtual_stages: schedule {p.pp_schedule} needs virtual_stages {need}, got {p.virtual_stages}"]
    if stage_style(p.pp_schedule) == "v" and p.virtual_stages != 2:
        return [f"parallel.virtual_stages: schedule {p.pp_schedule} places exactly 2 stages per rank (V shape); "
                f"set virtual_stages: 2"]
    stages = p.pp * p.virtual_stages
    if p.pp_split not in ("even", "cost"):
        return [f"parallel.pp_split: {p.pp_split!r} is not one of even, cost"]
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
    p, m, seq = cfg.parallel, cfg.model, cfg.train.seq_len
    if p.sp_method not in SP_METHODS:
        return [f"parallel.sp_method: {p.sp_method!r} is not one of {', '.join(SP_METHODS)}"]
    if p.sp == 1:
        return []
    if p.sp_method == "usp" and p.usp.ulysses * p.usp.ring != p.sp:
        return [f"parallel.usp: ulysses*ring = {p.usp.ulysses}*{p.usp.ring} = {p.usp.ulysses * p.usp.ring} must equal "
                f"parallel.sp ({p.sp}); e.g. usp: {{ulysses: 2, ring: {max(1, p.sp // 2)}}}"]
    try:
        from meshweave.attention import validate_sp
    except ImportError:
        validate_sp = None
    if validate_sp is not None:
        usp = p.usp.ulysses if p.sp_method == "usp" else None
        return validate_sp(p.sp_method, m.n_heads // p.tp, m.n_kv_heads // p.tp, p.sp, seq, usp)
    if seq % (2 * p.sp):
        return [f"train.seq_len: {seq} is not divisible by 2*sp = {2 * p.sp} (zigzag sharding)"]
    return []


def _batch(cfg: Config, world: int) -> list[str]:
    t, p = cfg.train, cfg.parallel
    dp = max(1, resolved_dp(cfg, world))
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
    t = cfg.train
    if t.steps < 1:
        return [f"train.steps: {t.steps} must be >= 1"]
    if t.seq_len < 2:
        return [f"train.seq_len: {t.seq_len} must be >= 2"]
    if t.lr <= 0:
        return [f"train.lr: {t.lr} must be > 0"]
    if t.warmup_steps is not None and not 0 <= t.warmup_steps <= t.steps:
        return [f"train.warmup_steps: {t.warmup_steps} must be between 0 and train.steps ({t.steps})"]
    if t.dtype not in ("auto", "float32", "bfloat16"):
        return [f"train.dtype: {t.dtype!r} is not one of auto, float32, bfloat16"]
    if t.device not in ("auto", "cpu", "cuda"):
        return [f"train.device: {t.device!r} is not one of auto, cpu, cuda"]
    if t.device == "cuda" and not torch.cuda.is_available():
        return ["train.device: cuda was asked for but no CUDA device is visible; use device: auto or cpu"]
    if t.nproc < 1:
        return [f"train.nproc: {t.nproc} must be >= 1"]
    if cfg.logging.every_steps < 1:
        return [f"logging.every_steps: {cfg.logging.every_steps} must be >= 1"]
    return []


def _data(cfg: Config, world: int) -> list[str]:
    d = cfg.data
    if d.source not in ("builtin", "path", "synthetic"):
        return [f"data.source: {d.source!r} is not one of builtin, path, synthetic"]
    if d.source == "path" and (d.path is None or not Path(d.path).exists()):
        return [f"data.path: {d.path!r} does not exist; give a text file or a directory of .txt/.md/.py files"]
    return []


def _checkpoint(cfg: Config, world: int) -> list[str]:
    c = cfg.checkpoint
    if c.dir is None:
        return []
    try:
        from meshweave.checkpoint import validate_checkpoint_settings
        from meshweave.runtime.build import checkpoint_settings
    except ImportError:
        return []
    return validate_checkpoint_settings(checkpoint_settings(cfg))


def _paths(cfg: Config, world: int) -> list[str]:
    problems = []
    for field, value in (("run_dir", cfg.run_dir), ("checkpoint.dir", cfg.checkpoint.dir),
                         ("checkpoint.persistent_dir", cfg.checkpoint.persistent_dir)):
        if value is not None and not _writable(Path(value)):
            problems.append(f"{field}: {value!r} is not writable; choose a directory you can write to")
    return problems


def _writable(path: Path) -> bool:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)
