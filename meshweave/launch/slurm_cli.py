"""`meshweave slurm`: write or submit an sbatch script for a config (issue 14).

    meshweave slurm CONFIG --nodes N --gpus-per-node G [--partition P --time 4:00:00 --account A
                   --job-name J --output DIR --out FILE --submit] [--set k=v ...]

The config is checked against nodes x processes per node with the checks `meshweave train` runs
(a bad request is one line, exit 2, and nothing is written or submitted); then the script
(launch/slurm_script.py) is printed, written to --out, or submitted with `sbatch --parsable`, whose job
id is printed. The layout goes to stderr, so stdout is the script or the job id alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from meshweave.core.config import ConfigError

EXIT_SUBMIT = 1  # sbatch ran and refused the job (its own message is shown)
EXIT_NO_SBATCH = 3  # the machine cannot submit (no sbatch): like a path this machine cannot use


def register(sub: argparse._SubParsersAction, with_config: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add this module's subcommand(s) to the `meshweave` parser."""
    p = with_config("slurm", "write (or --submit) an sbatch script: one torchrun per node, requeue on preemption")
    p.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (one process each); 0 = CPU nodes")
    p.add_argument("--nproc-per-node", type=int, help="processes per node on CPU nodes (default: --cpus-per-node)")
    p.add_argument("--cpus-per-node", type=int, help="CPUs to ask for per node (default: the whole node, --exclusive)")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, e.g. 4:00:00 (the job requeues itself shortly before it)")
    p.add_argument("--account")
    p.add_argument("--job-name", default="meshweave")
    p.add_argument("--output", metavar="DIR", help="directory of the job's log, DIR/JOBNAME-JOBID.out")
    p.add_argument("--ifname", help="network interface for NCCL/gloo between nodes (NCCL/GLOO_SOCKET_IFNAME)")
    p.add_argument("--port", type=int, help="rendezvous port on the first node (default: 20000 + job id %% 20000)")
    p.add_argument("--max-restarts", type=int, default=0, help="torchrun --max-restarts (default 0)")
    p.add_argument("--python", default=None,
                   help="interpreter with meshweave installed on the nodes (default: the one running this command)")
    p.add_argument("--sbatch-option", action="append", default=[], metavar="OPT",
                   help="another #SBATCH option, verbatim, e.g. --sbatch-option=--qos=high (repeatable)")
    p.add_argument("--out", metavar="FILE", help="write the script here instead of printing it")
    p.add_argument("--submit", action="store_true", help="submit with sbatch and print the job id")
    p.set_defaults(func=cmd_slurm)


def cmd_slurm(args: argparse.Namespace) -> int:
    from meshweave.launch.slurm_script import SlurmRequest, check_request, layout_line, procs_per_node, render
    from meshweave.train.config import load_config

    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts: {args.max_restarts} must be >= 0")
    for opt in args.sbatch_option:
        if not opt.startswith("--") or any(c in opt for c in "\n\r"):
            raise ConfigError(f"--sbatch-option: {opt!r} must be one long option, e.g. --qos=high")
    cfg = load_config(args.config, args.set)
    req = SlurmRequest(
        config=args.config, overrides=tuple(args.set), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        nproc_per_node=procs_per_node(args.gpus_per_node, args.nproc_per_node, args.cpus_per_node),
        cpus_per_node=args.cpus_per_node, partition=args.partition, time=args.time, account=args.account,
        job_name=args.job_name, output_dir=args.output, port=args.port, ifname=args.ifname,
        max_restarts=args.max_restarts, python=args.python or sys.executable, extra_sbatch=tuple(args.sbatch_option))
    check_request(cfg, req)
    layout = layout_line(cfg, req)
    script = render(req, layout)
    print(f"meshweave: {layout}", file=sys.stderr)
    if not cfg.checkpoint.dir:
        print("meshweave: note: checkpoint.dir is not set, so a requeued job starts from step 0", file=sys.stderr)
    elif cfg.checkpoint.node_local and "persistent" not in cfg.checkpoint.levels:
        print("meshweave: note: checkpoint.node_local without a persistent level: a requeued job that lands on other "
              "nodes starts from step 0 (add checkpoint.persistent_dir on shared storage)", file=sys.stderr)
    if args.output:
        Path(args.output).mkdir(parents=True, exist_ok=True)  # SLURM does not create it; the job would fail
    if args.out:
        Path(args.out).write_text(script)
        os.chmod(args.out, 0o755)
        print(f"meshweave: wrote {args.out}", file=sys.stderr)
    if not args.submit:
        if not args.out:
            print(script, end="")
        return 0
    return _submit(script, args.out)


def _submit(script: str, path: str | None) -> int:
    """`sbatch --parsable` (the file, or the script on stdin); prints the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        print("meshweave: submit error: sbatch is not on PATH; run on a SLURM login node, or drop --submit and "
              "submit the script yourself", file=sys.stderr)
        return EXIT_NO_SBATCH
    cmd = [sbatch, "--parsable"] + ([path] if path else [])
    try:
        proc = subprocess.run(cmd, input=None if path else script, capture_output=True, text=True, timeout=120, check=False)
    except subprocess.TimeoutExpired:
        print("meshweave: submit error: sbatch did not answer within 120 s", file=sys.stderr)
        return EXIT_SUBMIT
    if proc.returncode != 0:
        reason = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        print(f"meshweave: submit error: sbatch refused the job: {reason}", file=sys.stderr)
        return EXIT_SUBMIT
    job_id = proc.stdout.strip().split(";")[0]
    print(job_id)
    print(f"meshweave: submitted job {job_id}", file=sys.stderr)
    return 0
