"""`meshweave` command line: train, plan, config, ckpt.

Config problems are found before any process starts and reported as one line with exit status 2.
Nothing imported at module level loads torch, so `plan` and `config` answer in about a second.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid

from meshweave.core.dims import ParallelDims
from meshweave.core.schema import Config
from meshweave.launch.env import detect, free_port, slurm_to_torch_env
from meshweave.launch.plan import picked_defaults, render_plan
from meshweave.train.config import ConfigError, dump_yaml, load_config, to_dict
from meshweave.train.validate import check, resolve_defaults

EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"meshweave: config error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except BrokenPipeError:  # `meshweave plan ... | head`: the reader left; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshweave", description="Data, tensor, pipeline and sequence parallel "
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
    plan.set_defaults(func=cmd_plan)
    with_config("config", "print the fully resolved config").set_defaults(func=cmd_config)
    ckpt = sub.add_parser("ckpt", help="inspect checkpoints: ckpt list DIR | ckpt verify DIR")
    ckpt.add_argument("rest", nargs=argparse.REMAINDER)
    ckpt.set_defaults(func=cmd_ckpt)
    return parser


def cmd_config(args: argparse.Namespace) -> int:
    print(dump_yaml(load_config(args.config, args.set)), end="")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    check(cfg, args.world_size)
    resolved = resolve_defaults(cfg, args.world_size)
    print(render_plan(resolved, ParallelDims.resolve(resolved.parallel, args.world_size), picked_defaults(cfg, resolved)))
    return 0


def cmd_ckpt(args: argparse.Namespace) -> int:
    from meshweave.checkpoint.inspect import ckpt_main

    return ckpt_main(args.rest)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    env = detect()
    if env.kind == "standalone":
        nproc = args.nproc or cfg.train.nproc
        check(cfg, nproc)
        return _train_standalone(resolve_defaults(cfg, nproc), nproc)
    check(cfg, env.world_size)
    cfg = resolve_defaults(cfg, env.world_size)
    if env.kind == "slurm":
        os.environ.update(slurm_to_torch_env(os.environ))
    from meshweave.launch.worker import run_worker

    run_worker(to_dict(cfg))
    return 0


def _train_standalone(cfg: Config, nproc: int) -> int:
    """Start nproc local workers through torch's elastic launcher (what torchrun uses), not by hand."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from meshweave.launch.worker import run_worker

    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"meshweave-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn")
    print(f"meshweave: training on {nproc} local process(es); run dir {cfg.run_dir}", flush=True)
    try:
        elastic_launch(launch, run_worker)(to_dict(cfg))
    except ChildFailedError as err:
        print(f"meshweave: training failed:\n{err.format_msg()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
