"""The sbatch script `meshweave slurm` writes, and the checks of a request against its config (torch-free).

One launcher per node: `srun --ntasks-per-node=1` starts torchrun on every node of the allocation, and
the torchruns meet in a c10d rendezvous hosted on the job's first node (`scontrol show hostnames`), at a
port derived from the job id (as launch/env.py derives MASTER_PORT under plain srun) so that two jobs
sharing a head node do not collide. Each torchrun starts `--nproc-per-node` workers running
`meshweave train CONFIG --set ...`.

Requeue: `#SBATCH --requeue` lets SLURM requeue a preempted job; `#SBATCH --signal=B:USR1@LEAD` makes
SLURM signal the batch shell LEAD seconds before the time limit, and its trap stops the training with
SIGTERM (every rank stops at the same step and saves a checkpoint: launch/interrupt.py) and then
requeues the job. A requeued job runs the same script again and `meshweave train` resumes from the
newest complete checkpoint under checkpoint.dir (train/trainer.py), so the checkpoint directory must be
on storage every node sees.

The text depends only on the request (no timestamps, no host names), so it can be compared with a file.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass, field

from meshweave.core.config import ConfigError
from meshweave.core.dims import ParallelDims, resolved_dp
from meshweave.core.schema import Config

REQUEUE_SIGNAL_LEAD_S = 120  # seconds before the time limit at which the batch shell gets SIGUSR1
PORT_BASE = 20000  # rendezvous port = PORT_BASE + job id % 20000 (unless --port)
_SBATCH_VALUE = re.compile(r"[A-Za-z0-9_.,:@%+=/\-\[\]]+")  # what may follow `#SBATCH --opt=` unquoted


@dataclass(frozen=True)
class SlurmRequest:
    """What `meshweave slurm` was asked for."""

    config: str | None  # the YAML path as given (None: the built-in config)
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE, kept for `meshweave train`
    nodes: int = 1
    gpus_per_node: int = 0
    nproc_per_node: int = 1  # worker processes per node (one per GPU on GPU nodes)
    cpus_per_node: int | None = None  # None: the whole node (--exclusive)
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    job_name: str = "meshweave"
    output_dir: str | None = None  # where SLURM writes the job's log (%x-%j.out); None: the submit directory
    port: int | None = None  # None: PORT_BASE + job id % 20000
    ifname: str | None = None  # network interface for NCCL/gloo sockets (None: left to NCCL/gloo)
    max_restarts: int = 0  # torchrun --max-restarts
    python: str = "python"  # the interpreter that has meshweave installed, on every node
    extra_sbatch: tuple[str, ...] = field(default_factory=tuple)  # more `#SBATCH` options, verbatim

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


def procs_per_node(gpus: int | None, nproc: int | None, cpus: int | None) -> int:
    """Worker processes per node: one per GPU; on CPU nodes --nproc-per-node, else one per CPU."""
    if gpus is not None and gpus < 0:
        raise ConfigError(f"--gpus-per-node: {gpus} must be >= 0 (0 for CPU-only nodes)")
    if nproc is not None and nproc < 1:
        raise ConfigError(f"--nproc-per-node: {nproc} must be >= 1")
    if cpus is not None and cpus < 1:
        raise ConfigError(f"--cpus-per-node: {cpus} must be >= 1")
    if gpus:
        if nproc is not None and nproc != gpus:
            raise ConfigError(f"--nproc-per-node: {nproc} differs from --gpus-per-node {gpus}; meshweave runs one "
                              f"process per GPU (drop --nproc-per-node)")
        return gpus
    if nproc is not None:
        return nproc
    if cpus is not None:
        return cpus
    raise ConfigError("--gpus-per-node 0 needs --nproc-per-node N (or --cpus-per-node N for one process per CPU)")


def check_request(cfg: Config, req: SlurmRequest) -> None:
    """Refuse, with one line naming the fix, a request the config's layout cannot run on; then the config's
    own checks (train/validate.py `check`) for nodes x processes per node."""
    from meshweave.train.validate import check  # torch-free, but heavy: loaded when a command runs

    if req.nodes < 1:
        raise ConfigError(f"--nodes: {req.nodes} must be >= 1")
    for name, value in (("--partition", req.partition), ("--time", req.time), ("--account", req.account),
                        ("--job-name", req.job_name), ("--output", req.output_dir)):
        if value is not None and not _SBATCH_VALUE.fullmatch(value):
            raise ConfigError(f"{name}: {value!r} has characters an #SBATCH line cannot hold (spaces, quotes, "
                              f"newlines); use letters, digits and _.,:@%+=/-")
    if req.port is not None and not 1 <= req.port <= 65535:
        raise ConfigError(f"--port: {req.port} must be in [1, 65535]")
    p, world, per_node = cfg.parallel, req.world_size, req.nproc_per_node
    asked = f"--nodes {req.nodes} x {per_node} processes per node = {world}"
    if p.dp != -1 and p.tp >= 1 and p.pp >= 1 and p.sp >= 1 and p.dp >= 1:
        fixed = p.dp * p.tp * p.pp * p.sp
        if fixed != world:
            hint = (f"ask for {fixed // per_node} node(s)" if fixed % per_node == 0 and fixed >= per_node
                    else "change the degrees")
            raise ConfigError(f"parallel: the layout dp*tp*pp*sp = {p.dp}*{p.tp}*{p.pp}*{p.sp} = {fixed} processes, "
                              f"but {asked}; {hint}, or set parallel.dp: -1 to fill the processes")
    elif p.tp >= 1 and p.pp >= 1 and p.sp >= 1 and world % (p.tp * p.pp * p.sp):
        other = p.tp * p.pp * p.sp
        raise ConfigError(f"parallel: tp*pp*sp = {p.tp}*{p.pp}*{p.sp} = {other} does not divide {asked}; "
                          f"choose degrees whose product divides {world}, or another node count")
    if p.tp > per_node:
        raise ConfigError(f"parallel.tp: {p.tp} is larger than the {per_node} processes per node; tensor-parallel "
                          f"peers must share a node (use tp <= {per_node})")
    if p.tp >= 1 and per_node % p.tp:
        raise ConfigError(f"parallel.tp: {p.tp} does not divide the {per_node} processes per node, so a "
                          f"tensor-parallel group would span two nodes; use a tp that divides {per_node}")
    if cfg.train.device == "cuda" and not req.gpus_per_node:
        raise ConfigError("train.device: cuda, but --gpus-per-node is 0; ask for GPUs or use device: auto or cpu")
    if cfg.train.device == "cuda":  # the submit host need not have a GPU: the nodes will
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="auto"))
    check(cfg, world)


def layout_line(cfg: Config, req: SlurmRequest) -> str:
    """The resolved layout in words, e.g. `2 nodes x 8 = 16 processes: dp=4 tp=2 pp=2 sp=1`."""
    dims = ParallelDims.resolve(cfg.parallel, req.world_size)
    return (f"{req.nodes} node(s) x {req.nproc_per_node} = {req.world_size} processes: "
            f"dp={resolved_dp(cfg.parallel, req.world_size)} tp={dims.tp} pp={dims.pp} sp={dims.sp}")


def render(req: SlurmRequest, layout: str) -> str:
    """The sbatch script for the request (deterministic text)."""
    q = shlex.quote
    train_args = "".join(f" {q(a)}" for a in ([req.config] if req.config else []))
    train_args += "".join(f" \\\n        --set {q(kv)}" for kv in req.overrides)
    port = str(req.port) if req.port is not None else f"$(( {PORT_BASE} + SLURM_JOB_ID % 20000 ))"
    sbatch = [f"--job-name={req.job_name}", f"--nodes={req.nodes}", "--ntasks-per-node=1"]
    if req.gpus_per_node:
        sbatch.append(f"--gpus-per-node={req.gpus_per_node}")
    sbatch.append(f"--cpus-per-task={req.cpus_per_node}" if req.cpus_per_node else "--exclusive")
    sbatch += [f"--{name}={value}" for name, value in (("partition", req.partition), ("time", req.time),
                                                         ("account", req.account)) if value]
    out = f"{req.output_dir.rstrip('/')}/%x-%j.out" if req.output_dir else "%x-%j.out"
    sbatch += [f"--output={out}", "--open-mode=append", "--requeue", f"--signal=B:USR1@{REQUEUE_SIGNAL_LEAD_S}",
               *req.extra_sbatch]
    threads = max(1, req.cpus_per_node // req.nproc_per_node) if req.cpus_per_node else 1
    ifname = (f'export NCCL_SOCKET_IFNAME="${{NCCL_SOCKET_IFNAME:-{req.ifname}}}"\n'
              f'export GLOO_SOCKET_IFNAME="${{GLOO_SOCKET_IFNAME:-{req.ifname}}}"\n' if req.ifname else
              "# The network interface NCCL and gloo use between nodes (e.g. ib0, eth0): export NCCL_SOCKET_IFNAME\n"
              "# and GLOO_SOCKET_IFNAME before sbatch (they are passed on), or write `meshweave slurm --ifname IF`.\n")
    cpus = '--cpus-per-task="$SLURM_CPUS_PER_TASK"' if req.cpus_per_node else '--cpus-per-task="$SLURM_CPUS_ON_NODE"'
    lines = "\n".join(f"#SBATCH {opt}" for opt in sbatch)
    return f"""#!/bin/bash
# Written by `meshweave slurm`: {layout}.
# One torchrun per node (srun --ntasks-per-node=1), c10d rendezvous on the job's first node.
# Requeued on preemption (--requeue) and before the time limit (SIGUSR1 trap below); `meshweave train`
# resumes from the newest checkpoint in checkpoint.dir, which must be on storage every node sees (or, with
# checkpoint.node_local, on each node's disk, e.g. $SLURM_TMPDIR/ckpt, beside a shared persistent_dir).
{lines}
set -uo pipefail

# Overridable: a variable already set when sbatch runs wins.
{ifname}export TORCH_NCCL_ASYNC_ERROR_HANDLING="${{TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}}"
export NCCL_DEBUG="${{NCCL_DEBUG:-WARN}}"
export OMP_NUM_THREADS="${{OMP_NUM_THREADS:-{threads}}}"
# torchrun restarts (--max-restarts, a requeued job) re-rendezvous reliably only with its own store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
port="{port}"
echo "meshweave: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST, rendezvous $head_node:$port"

requeue() {{
    echo "meshweave: job $SLURM_JOB_ID near its time limit or preempted: saving and requeueing"
    # SIGTERM to the training step's tasks (torchrun passes it to its workers): every rank stops at the next
    # step and saves. (SIGTERM to srun itself would end the step at once, with nothing saved.)
    scancel --signal=TERM "$SLURM_JOB_ID.0"
    wait "$srun_pid"
    scontrol requeue "$SLURM_JOB_ID"
}}
trap requeue USR1

srun --ntasks-per-node=1 --nodes="$SLURM_NNODES" {cpus} --kill-on-bad-exit=1 \\
    {q(req.python)} -m torch.distributed.run --nnodes "$SLURM_NNODES" --nproc-per-node {req.nproc_per_node} \\
    --rdzv-backend c10d --rdzv-endpoint "$head_node:$port" --rdzv-id "$SLURM_JOB_ID" \\
    --max-restarts {req.max_restarts} \\
    -m meshweave train{train_args} &
srun_pid=$!
wait "$srun_pid"
status=$?
while kill -0 "$srun_pid" 2>/dev/null; do  # `wait` returns early when the trap ran; wait for srun itself
    wait "$srun_pid"
    status=$?
done
exit "$status"
"""
