"""`meshweave` command line: train, plan, config, ckpt, slurm, bench, swarm.

Problems found before any process starts are one line on stderr: exit status 2 for the config (and
the command line), 3 for data, checkpoints or paths that cannot be used. A failed or interrupted
training run also ends with one line (launch/errors.py): 1 runtime, 2 config, 3 data/filesystem,
130 / 143 after SIGINT / SIGTERM. Nothing imported at module level loads torch, so `plan` and
`config` answer in about a second.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from typing import NoReturn

from meshweave.core.config import check_ranges
from meshweave.core.dims import ParallelDims
from meshweave.core.schema import INT_LIMIT, Config
from meshweave.launch.env import LaunchEnv, detect, slurm_to_torch_env
from meshweave.launch.errors import EXIT_CONFIG, EXIT_DATA
from meshweave.launch.plan import picked_defaults, render_plan
from meshweave.train.config import ConfigError, dump_yaml, load_config, to_dict
from meshweave.train.validate import PathError, check, resolve_defaults


def _interrupt_start_up(signum: int, frame: object) -> None:
    """Ctrl-C / SIGTERM while `train` checks, before any process or directory exists: one line and out.
    (Raising instead could land inside torch's import, which turns it into an unrelated error.)"""
    if (os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or "0") == "0":
        os.write(2, b"meshweave: interrupted before training started; nothing was saved\n")
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        kind, status = ("filesystem", EXIT_DATA) if isinstance(err, PathError) else ("config", EXIT_CONFIG)
        return _start_up_error(f"meshweave: {kind} error: {err}", status)
    except BrokenPipeError:  # `meshweave plan ... | head`: the reader left; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as err:  # e.g. the run directory could not be created after all
        return _start_up_error(f"meshweave: filesystem error: {err}", EXIT_DATA)
    except Exception as err:
        kind = _start_up_data_problem(err)
        if kind is None:
            raise
        return _start_up_error(f"meshweave: {kind} error: {err}", EXIT_DATA)


def _start_up_data_problem(err: Exception) -> str | None:
    """"data" / "checkpoint" for the start-up checks' own errors (their modules load torch: looked up lazily)."""
    if type(err).__name__ == "DataError":
        return "data"
    if type(err).__name__ == "CheckpointMismatch":
        return "checkpoint"
    return None


def _start_up_error(line: str, status: int) -> int:
    """Print the line (under torchrun/srun only on each node's first rank: every rank finds the same) and
    return the status."""
    local_rank = os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or "0"
    if local_rank == "0":
        print(line, file=sys.stderr)
    return status


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2) like every other start-up error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"meshweave: usage error: {message} (see {self.prog} --help)\n")


def _count(name: str, value: int) -> int:
    """A process count from the command line or the environment: >= 1 and a 64-bit integer."""
    if not 1 <= value <= INT_LIMIT:
        shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:40]}... ({len(str(value))} digits)"
        raise ConfigError(f"{name}: {shown} must be >= 1" + (" and below 2**63" if value > INT_LIMIT else ""))
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="meshweave", description="Data, tensor, pipeline and sequence parallel "
                     "training for PyTorch from one YAML file.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", nargs="?", help="YAML config (default: the built-in small run)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set parallel.dp=2 (repeatable)")
        return p

    train = with_config("train", "train (standalone, under torchrun, or under srun)")
    train.add_argument("--nproc", type=int, help="local worker processes when standalone (default: train.nproc)")
    train.set_defaults(func=cmd_train)
    plan = with_config("plan", "dry run: validate and print the layout, memory and FLOPs; starts nothing")
    plan.add_argument("--world-size", type=int, required=True)
    plan.add_argument("--adaptive", action="store_true",
                      help="sp: adaptive: also plan the first steps' batches and show groups and predicted times")
    plan.set_defaults(func=cmd_plan)
    with_config("config", "print the fully resolved config").set_defaults(func=cmd_config)
    ckpt = sub.add_parser("ckpt", help="inspect checkpoints: ckpt list DIR | ckpt verify DIR")
    ckpt.add_argument("rest", nargs=argparse.REMAINDER)
    ckpt.set_defaults(func=cmd_ckpt)
    for register in _command_modules():
        register(sub, with_config)
    return parser


def _command_modules() -> list:
    """The subcommands that live in their own modules (each adds its parsers; none loads torch at import)."""
    from meshweave.launch import bench_cli, slurm_cli, swarm_cli

    return [slurm_cli.register, bench_cli.register, swarm_cli.register]


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    check_ranges(cfg)
    print(dump_yaml(cfg), end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    check(cfg, _count("--world-size", args.world_size))
    resolved = resolve_defaults(cfg, args.world_size)
    print(render_plan(resolved, ParallelDims.resolve(resolved.parallel, args.world_size), picked_defaults(cfg, resolved)))
    if args.adaptive:
        if not resolved.parallel.adaptive.enabled:
            raise ConfigError("--adaptive shows the plans of parallel.sp: adaptive; set it (--set parallel.sp=adaptive "
                              "--set data.packing=false)")
        from meshweave.launch.plan_adaptive import render_adaptive_plan

        print(render_adaptive_plan(resolved, args.world_size))
    return 0


def cmd_ckpt(args: argparse.Namespace) -> int:
    from meshweave.checkpoint.inspect import ckpt_main

    return ckpt_main(args.rest)


def cmd_train(args: argparse.Namespace) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):  # one line, not a KeyboardInterrupt traceback
        signal.signal(sig, _interrupt_start_up)
    cfg = load_config(args.config, args.set)
    env = _launch_env()
    if env.kind == "standalone":
        nproc = cfg.train.nproc if args.nproc is None else _count("--nproc", args.nproc)
        if cfg.fault_tolerance.mode == "swarm":
            return _train_swarm(cfg)
        check(cfg, nproc)
        cfg = resolve_defaults(cfg, nproc)
        _preflight(cfg, nproc, local_ranks=nproc)
        from meshweave.launch.standalone import run_standalone

        return run_standalone(cfg, nproc)
    world = _count("WORLD_SIZE" if env.kind == "torchrun" else "SLURM_NTASKS", env.world_size or 0)
    check(cfg, world)
    cfg = resolve_defaults(cfg, world)
    _preflight(cfg, world, local_ranks=_local_ranks())
    if env.kind == "slurm":
        os.environ.update(slurm_to_torch_env(os.environ))
    from meshweave.launch.worker import run_worker

    run_worker(to_dict(cfg))  # a failed or interrupted rank exits inside, with its own status
    return 0


def _train_swarm(cfg) -> int:
    """fault_tolerance.mode: swarm from `meshweave train`: coordinator and peers on this machine."""
    from meshweave.train.validate_swarm import check_swarm

    check_swarm(cfg)
    from meshweave.launch.swarm_local import run_local

    return run_local(cfg)


def _launch_env() -> LaunchEnv:
    try:
        return detect()
    except ValueError:
        raise ConfigError("WORLD_SIZE / SLURM_NTASKS: not an integer; launch with torchrun, srun, or neither") from None


def _local_ranks() -> int:
    """Ranks sharing this machine under torchrun (LOCAL_WORLD_SIZE) or srun (SLURM_NTASKS_PER_NODE, e.g. "4(x2)")."""
    text = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or "1"
    match = re.match(r"\d+", text)
    return max(1, int(match.group())) if match else 1


def _preflight(cfg: Config, world_size: int, local_ranks: int) -> None:
    from meshweave.core.mesh import device_type_for
    from meshweave.launch.preflight import preflight

    preflight(cfg, world_size, local_ranks, device_type_for(cfg.train.device))


if __name__ == "__main__":
    sys.exit(main())
