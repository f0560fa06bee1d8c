"""The YAML schema (version 1): one dataclass per section; field comments are the documentation.

`meshweave config CONFIG` prints the resolved result. Only these names are accepted; anything else
is rejected with a did-you-mean hint by `meshweave.core.config`.
"""

from __future__ import annotations

import math
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, get_args

from meshweave.core.errors import ConfigError

SCHEMA_VERSION = 1
INT_LIMIT = 2**63 - 1  # every integer field must fit a signed 64-bit integer (what torch and the OS take)


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts, declared beside the field: `steps: Annotated[int, Range(ge=1)]`.

    `meshweave.core.config.range_problems` checks every numeric field of a loaded config against its
    declaration (and every float for finiteness, every int against the 64-bit limit), before any
    process starts. `also` lists values accepted outside the bounds, `meaning` says what they mean
    (e.g. `dp: -1` = fill the world size; `microbatches: 0` = picked automatically).
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    also: tuple[float, ...] = ()
    meaning: str = ""

    def accepts(self, value: float) -> bool:
        if value in self.also:
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        """The accepted values in words: ">= 1", "> 0", "in [0, 1)", ">= 1, or -1 to fill the world size"."""
        low = (f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None)
        high = (f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None)
        if low and high:
            text = f"in {low}, {high}"
        elif low:
            text = f">= {low[1:]}" if low[0] == "[" else f"> {low[1:]}"
        elif high:
            text = f"<= {high[:-1]}" if high[-1] == "]" else f"< {high[:-1]}"
        else:
            text = "a finite number"
        if self.also:
            text += ", or " + " or ".join(_num(v) for v in self.also) + (f" {self.meaning}" if self.meaning else "")
        return text


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


# The common ranges, named once.
AtLeast1 = Annotated[int, Range(ge=1)]
AtLeast0 = Annotated[int, Range(ge=0)]
Positive = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]
AtLeast1OrAuto = Annotated[int, Range(ge=1, also=(0,), meaning="(picked automatically)")]
AtLeast1OrFill = Annotated[int, Range(ge=1, also=(-1,), meaning="to fill the world size")]

SpMethod = Literal["ulysses", "ring", "tokenring", "usp", "allgather", "dsp"]
SP_METHODS: tuple[str, ...] = get_args(SpMethod)  # the one list of sequence-parallel methods
CHECKPOINT_LEVELS = ("memory", "local", "persistent")  # also the only valid flush order


@dataclass
class UspConfig:
    ulysses: AtLeast1OrAuto = 0  # Ulysses (all-to-all) degree inside each SP group; 0 = the largest the heads allow
    ring: AtLeast1OrAuto = 0  # Ring degree across; ulysses * ring must equal parallel.sp; 0 = sp / ulysses


@dataclass
class AdaptiveCostConfig:
    """The adaptive planner's cost model; a value left at 0 is measured at start-up (and cached per machine)."""

    alpha1: NonNegative = 0.0  # seconds per token^2 of one sequence's fwd+bwd on one rank (attention)
    alpha2: NonNegative = 0.0  # seconds per token of one sequence's fwd+bwd on one rank (everything else)
    beta: NonNegative = 0.0  # seconds of fixed cost per group per micro-batch
    bandwidth_gbps: NonNegative = 0.0  # all-to-all bandwidth inside an SP group, GB/s (one value for every size)


@dataclass
class AdaptiveConfig:
    """`parallel.sp: adaptive`: each step's whole documents are placed on SP groups of varying size (FlexSP)."""

    enabled: bool = False  # set by `sp: adaptive` (the mesh then has sp 1; groups are carved from dp ranks)
    strategy: Literal["milp", "greedy", "megatron", "static"] = "milp"  # milp = FlexSP; the others are its peers
    static_size: AtLeast1 = 1  # strategy static: the one group size used for every sequence
    tokens_per_rank: AtLeast1OrAuto = 0  # tokens one rank may hold per micro-batch; 0 = data.max_len
    time_limit_ms: Positive = 50.0  # MILP solver time limit per step (then its best plan, or greedy)
    mip_gap: Annotated[float, Range(ge=0, lt=1)] = 0.01  # relative optimality gap the solver may stop at
    cost: AdaptiveCostConfig = field(default_factory=AdaptiveCostConfig)


@dataclass
class ParallelConfig:
    dp: AtLeast1OrFill = -1  # data-parallel degree; -1 = whatever the world size leaves after tp*pp*sp
    tp: AtLeast1 = 1  # tensor-parallel degree
    pp: AtLeast1 = 1  # pipeline-parallel degree (stages)
    sp: AtLeast1 = 1  # sequence-parallel degree (attention split over the sequence); `sp: adaptive` = see adaptive
    dp_mode: Literal["fsdp", "ddp"] = "fsdp"  # FSDP2 fully_shard, or DDP
    sp_method: SpMethod = "ring"  # ulysses | ring | tokenring | usp | allgather (K/V all-gathered: LASP-2H's) | dsp (st_dit)
    usp: UspConfig = field(default_factory=UspConfig)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved1f1b | zerobubble ...
    microbatches: AtLeast1OrAuto = 0  # pipeline microbatches per step per data-parallel rank; 0 = picked to fit (see plan)
    virtual_stages: AtLeast1 = 1  # model chunks per pipeline rank (interleaved schedules)
    pp_split: Literal["even", "cost"] = "even"  # even, or balanced by estimated per-layer cost
    activation_checkpointing: bool = False  # recompute each block in backward
    adaptive: AdaptiveConfig = field(default_factory=AdaptiveConfig)


@dataclass
class TrainConfig:
    steps: AtLeast1 = 200  # optimizer steps
    global_batch: AtLeast1 = 8  # sequences per optimizer step, over all data-parallel ranks
    grad_accum: AtLeast1 = 1  # micro-steps per optimizer step on each data-parallel rank (no pipeline)
    seq_len: Annotated[int, Range(ge=2)] = 256  # tokens per sequence
    lr: Positive = 3e-3  # peak learning rate
    min_lr_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: AtLeast0 | None = None  # linear warm-up steps; None = 10% of steps

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 10
    weight_decay: NonNegative = 0.1  # decoupled (AdamW) weight decay
    beta1: Annotated[float, Range(ge=0, lt=1)] = 0.9  # AdamW first-moment decay
    beta2: Annotated[float, Range(ge=0, lt=1)] = 0.95  # AdamW second-moment decay
    grad_clip: NonNegative = 1.0  # max global grad norm; 0 disables clipping
    seed: AtLeast0 = 0  # model init, data order and dropout
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    nproc: AtLeast1 = 2  # local worker processes when launched standalone (no torchrun/srun)
    peak_tflops: Positive | None = None  # per-device peak for MFU; None = known-device table or "n/a"


@dataclass
class DataConfig:
    source: Literal["builtin", "path", "synthetic"] = "builtin"  # builtin = text found offline on this machine
    path: str | None = None  # file or directory of UTF-8 text files, for source: path
    max_bytes: AtLeast1 = 4_000_000  # cap on corpus size read
    document_masking: bool = True  # attend only within a document in packed sequences
    synthetic_mean_len: AtLeast1 = 256  # source: synthetic — mean document length (long-tailed)
    synthetic_max_len: Annotated[int, Range(ge=2)] = 4096  # source: synthetic — longest document (tokens)
    packing: bool = True  # pack documents into rows of train.seq_len; false = whole documents (sp: adaptive)
    max_len: Annotated[int, Range(ge=2)] = 4096  # packing false: longer documents are cut into pieces of this many tokens
    tokens_per_step: AtLeast1 = 8192  # packing false: tokens per optimizer step (whole documents, at least one)


@dataclass
class CheckpointConfig:
    """Where, how often and how checkpoints are written (the one definition; checkpoint/ validates it).

    dir: the local checkpoint directory; None turns checkpointing off. Without node_local, every
        rank must see the same files (one node, or a path on shared storage): DCP reads other ranks'
        shards when it reshards.
    node_local: the local level is on each node's own disk (`dir` may differ per node, e.g.
        `$SLURM_TMPDIR/ckpt`): each rank writes and reads back only its own shard, so it resumes
        only on the same ranks and layout; anything else resumes from the persistent level.
    Directories expand environment variables ($VAR, ${VAR}) in each process.
    """

    dir: str | None = None  # None disables checkpointing
    every_steps: AtLeast0 = 0  # save after every N-th optimizer step; 0 = only at the end
    mode: Literal["lazy", "sync"] = "lazy"  # lazy: the copy overlaps the next forward/backward
    keep: AtLeast1 = 3  # committed checkpoints each disk level retains
    levels: list[str] = field(default_factory=lambda: ["local"])  # flush chain: memory, local, persistent
    persistent_dir: str | None = None  # shared/persistent directory, for the persistent level
    resume: bool = True  # resume from the newest complete checkpoint in dir
    verify: bool = True  # check every file a resume reads against the manifest's checksums (false: skip)
    writer: Literal["thread", "process"] = "thread"  # lazy mode: disk writes in a background thread or a writer process
    node_local: bool = False  # the local level is per node, not shared (see the class docstring)

    @property
    def enabled(self) -> bool:
        return self.dir is not None

    def disk_levels(self) -> list[str]:
        """The levels that live on disk, in flush order."""
        return [lvl for lvl in self.levels if lvl != "memory"]

    def level_dir(self, level: str) -> str:
        """The directory of a disk level, with environment variables expanded in this process."""
        if level == "local" and self.dir is not None:
            return _expand(self.dir, "checkpoint.dir")
        if level == "persistent" and self.persistent_dir is not None:
            return _expand(self.persistent_dir, "checkpoint.persistent_dir")
        raise ValueError(f"checkpoint level {level!r} has no directory")


class UnsetDirectoryVariable(ConfigError):
    """A checkpoint directory names an environment variable this process does not have (a config error: exit 2)."""


def _expand(path: str, field_name: str) -> str:
    expanded = os.path.expanduser(os.path.expandvars(path))
    unset = re.findall(r"\$\{?(\w+)", expanded)
    if unset:
        raise UnsetDirectoryVariable(f"{field_name}: {path!r} uses ${unset[0]}, which is not set in this process's "
                                     f"environment (on node {socket.gethostname()})")
    return expanded


@dataclass
class LoggingConfig:
    every_steps: AtLeast1 = 10  # progress line every N steps (and at the last step)
    jsonl: bool = True  # each rank writes run_dir/metrics/rank<R>.jsonl
    tensorboard: bool = False  # write TensorBoard events when tensorboard is installed
    comm_accounting: bool = False  # count every collective's bytes in the comm ledger (tests, benchmarks)


@dataclass
class FaultToleranceConfig:
    """SWARM-style fault-tolerant pipelines (meshweave/swarm/): each stage is served by interchangeable peers.

    mode swarm: `meshweave swarm coordinator CONFIG` plus any number of `meshweave swarm peer CONFIG`,
    or all of it locally from `meshweave train CONFIG` (one coordinator and `peers` per stage).
    Timeouts must rise in this order: heartbeat_s < dead_after_s < transfer_timeout_s.
    """

    mode: Literal["off", "swarm"] = "off"
    stages: AtLeast1 = 2  # pipeline stages; the model's layers are split evenly
    peers: Annotated[list[int], Range(ge=1)] = field(default_factory=lambda: [2, 2])  # local runs: peers per stage
    microbatches: AtLeast1OrAuto = 0  # per step; 0 = one per sequence of train.global_batch
    coordinator: str = "127.0.0.1:29470"  # host:port the coordinator listens on and peers connect to
    heartbeat_s: Positive = 0.5  # how often a peer says it is alive
    dead_after_s: Positive = 5.0  # a peer silent this long is declared dead
    transfer_timeout_s: Positive = 60.0  # an activation, gradient or all-reduce slower than this fails the step
    rebalance_every_s: NonNegative = 30.0  # least time between two peer moves; 0 = never move peers
    rebalance_gain: Annotated[float, Range(gt=1.0)] = 1.25  # move only if the bottleneck improves this much
    min_peers_per_stage: AtLeast1 = 1  # a stage never gives away its last peers below this
    wait_for_peers_s: Positive = 600.0  # a stage without peers pauses the job this long for one to join
    snapshot_every: AtLeast0 = 0  # save each stage every N steps (RUN_DIR/swarm/stages) so that a stage that
    #                               loses every peer is restored by a new one; 0 = off (the run then stops)


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
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
