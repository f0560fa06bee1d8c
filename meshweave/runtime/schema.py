"""The YAML schema (version 1): one dataclass per section; field comments are the documentation.

`meshweave config CONFIG` prints the resolved result. Only these names are accepted; anything else
is rejected with a did-you-mean hint by `meshweave.runtime.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meshweave.models.llama import ModelConfig

SCHEMA_VERSION = 1


@dataclass
class UspConfig:
    ulysses: int = 1  # Ulysses (all-to-all) degree inside each SP group
    ring: int = 1  # Ring degree across; ulysses * ring must equal parallel.sp


@dataclass
class ParallelConfig:
    dp: int = -1  # data-parallel degree; -1 = whatever the world size leaves after tp*pp*sp
    tp: int = 1  # tensor-parallel degree
    pp: int = 1  # pipeline-parallel degree (stages)
    sp: int = 1  # sequence-parallel degree (attention split over the sequence)
    dp_mode: str = "fsdp"  # fsdp (FSDP2 fully_shard) or ddp
    sp_method: str = "ring"  # ulysses | ring | tokenring | usp
    usp: UspConfig = field(default_factory=UspConfig)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved1f1b | zerobubble ...
    microbatches: int = 1  # pipeline microbatches per step (per data-parallel rank)
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedules)
    pp_split: str = "even"  # even | cost (balance by estimated per-layer cost)
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
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16
    device: str = "auto"  # auto | cpu | cuda
    nproc: int = 2  # local worker processes when launched standalone (no torchrun/srun)
    peak_tflops: float | None = None  # per-device peak for MFU; None = known-device table or "n/a"


@dataclass
class DataConfig:
    source: str = "builtin"  # builtin (text found offline on this machine) | path | synthetic
    path: str | None = None  # file or directory of UTF-8 text files, for source: path
    max_bytes: int = 4_000_000  # cap on corpus size read
    document_masking: bool = True  # attend only within a document in packed sequences
    synthetic_mean_len: int = 256  # source: synthetic — mean document length (long-tailed)
    synthetic_max_len: int = 4096


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None disables checkpointing
    every_steps: int = 0  # 0 = only at the end
    mode: str = "lazy"  # lazy (background copy overlapping compute) | sync
    keep: int = 3  # checkpoints kept
    levels: list[str] = field(default_factory=lambda: ["local"])  # memory, local, persistent
    persistent_dir: str | None = None
    resume: bool = True  # resume from the newest complete checkpoint in dir


@dataclass
class LoggingConfig:
    every_steps: int = 10  # progress line every N steps (and at the last step)
    jsonl: bool = True  # each rank writes run_dir/metrics/rank<R>.jsonl
    tensorboard: bool = False  # write TensorBoard events when tensorboard is installed


@dataclass
class Config:
    version: int = SCHEMA_VERSION
    run_dir: str = "runs/default"  # metrics, resolved config and (by default) checkpoints go here
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
