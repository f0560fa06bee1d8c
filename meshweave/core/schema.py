"""The YAML schema (version 1): one dataclass per section; field comments are the documentation.

`meshweave config CONFIG` prints the resolved result. Only these names are accepted; anything else
is rejected with a did-you-mean hint by `meshweave.core.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

SCHEMA_VERSION = 1

SpMethod = Literal["ulysses", "ring", "tokenring", "usp"]
SP_METHODS: tuple[str, ...] = get_args(SpMethod)  # the one list of sequence-parallel methods
CHECKPOINT_LEVELS = ("memory", "local", "persistent")  # also the only valid flush order


@dataclass
class UspConfig:
    ulysses: int = 0  # Ulysses (all-to-all) degree inside each SP group; 0 = the largest the heads allow
    ring: int = 0  # Ring degree across; ulysses * ring must equal parallel.sp; 0 = sp / ulysses


@dataclass
class ParallelConfig:
    dp: int = -1  # data-parallel degree; -1 = whatever the world size leaves after tp*pp*sp
    tp: int = 1  # tensor-parallel degree
    pp: int = 1  # pipeline-parallel degree (stages)
    sp: int = 1  # sequence-parallel degree (attention split over the sequence)
    dp_mode: Literal["fsdp", "ddp"] = "fsdp"  # FSDP2 fully_shard, or DDP
    sp_method: SpMethod = "ring"  # ulysses | ring | tokenring | usp
    usp: UspConfig = field(default_factory=UspConfig)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved1f1b | zerobubble ...
    microbatches: int = 0  # pipeline microbatches per step per data-parallel rank; 0 = picked to fit (see plan)
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedules)
    pp_split: Literal["even", "cost"] = "even"  # even, or balanced by estimated per-layer cost
    activation_checkpointing: bool = False  # recompute each block in backward


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    global_batch: int = 8  # sequences per optimizer step, over all data-parallel ranks
    grad_accum: int = 1  # micro-steps per optimizer step on each data-parallel rank (no pipeline)
    seq_len: int = 256  # tokens per sequence
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None  # linear warm-up steps; None = 10% of steps

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    seed: int = 0
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nproc: int = 2  # local worker processes when launched standalone (no torchrun/srun)
    peak_tflops: float | None = None  # per-device peak for MFU; None = known-device table or "n/a"


@dataclass
class DataConfig:
    source: Literal["builtin", "path", "synthetic"] = "builtin"  # builtin = text found offline on this machine
    path: str | None = None  # file or directory of UTF-8 text files, for source: path
    max_bytes: int = 4_000_000  # cap on corpus size read
    document_masking: bool = True  # attend only within a document in packed sequences
    synthetic_mean_len: int = 256  # source: synthetic — mean document length (long-tailed)
    synthetic_max_len: int = 4096


@dataclass
class CheckpointConfig:
    """Where, how often and how checkpoints are written (the one definition; checkpoint/ validates it).

    dir: the local checkpoint directory; None turns checkpointing off. Every rank that loads must
        see the same files (one node, or a path on shared storage): DCP reads other ranks' shards
        when it reshards.
    """

    dir: str | None = None  # None disables checkpointing
    every_steps: int = 0  # save after every N-th optimizer step; 0 = only at the end
    mode: Literal["lazy", "sync"] = "lazy"  # lazy: the copy overlaps the next forward/backward
    keep: int = 3  # committed checkpoints each disk level retains
    levels: list[str] = field(default_factory=lambda: ["local"])  # flush chain: memory, local, persistent
    persistent_dir: str | None = None  # shared/persistent directory, for the persistent level
    resume: bool = True  # resume from the newest complete checkpoint in dir

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def disk_levels(self) -> list[str]:
        """The levels that live on disk, in flush order."""
        return [lvl for lvl in self.levels if lvl != "memory"]

    def level_dir(self, level: str) -> str:
        """The directory of a disk level."""
        if level == "local" and self.dir is not None:
            return self.dir
        if level == "persistent" and self.persistent_dir is not None:
            return self.persistent_dir
        raise ValueError(f"checkpoint level {level!r} has no directory")


@dataclass
class LoggingConfig:
    every_steps: int = 10  # progress line every N steps (and at the last step)
    jsonl: bool = True  # each rank writes run_dir/metrics/rank<R>.jsonl
    tensorboard: bool = False  # write TensorBoard events when tensorboard is installed
    comm_accounting: bool = False  # count every collective's bytes in the comm ledger (tests, benchmarks)


@dataclass
class Config:
    version: int = SCHEMA_VERSION
    run_dir: str = "runs/default"  # metrics and the resolved config; relative to the working directory
    model: Any = None  # the model kind's config dataclass (kind: llama by default), set when loaded
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
