"""`meshweave swarm coordinator|peer CONFIG`: SWARM fault-tolerant pipelines (meshweave/swarm/).

The coordinator hosts the run's control plane at fault_tolerance.coordinator; peers connect to it,
get a stage, and serve until the run ends. Start as many peers as you like, at any time: a peer that
joins mid-run receives its stage's state from a live peer at the next step boundary.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from meshweave.train.config import ConfigError, load_config


def register(sub: argparse._SubParsersAction, with_config: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Add `swarm coordinator` and `swarm peer`."""
    swarm = sub.add_parser("swarm", help="fault-tolerant pipelines: swarm coordinator CONFIG | swarm peer CONFIG")
    roles = swarm.add_subparsers(dest="role", required=True)
    for role, text in (("coordinator", "run the control plane of a swarm run"),
                       ("peer", "serve a pipeline stage of a swarm run (the coordinator picks which)")):
        p = roles.add_parser(role, help=text)
        p.add_argument("config", nargs="?", help="YAML config with fault_tolerance.mode: swarm")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
        p.set_defaults(func=cmd_swarm)


def cmd_swarm(args: argparse.Namespace) -> int:
    from meshweave.train.validate_swarm import check_swarm

    cfg = load_config(args.config, args.set)
    check_swarm(cfg)
    if args.role == "coordinator":
        from meshweave.swarm.coordinator import Coordinator, SwarmStopped

        try:
            return Coordinator(cfg).run()
        except SwarmStopped as err:
            raise SystemExit(f"meshweave: swarm error: {err}") from None
    from meshweave.swarm.peer import Peer

    status = Peer(cfg).run()
    # Leave without running destructors: waits of aborted epochs may still block in gloo threads, and
    # destroying their groups at interpreter exit would abort the process (std::terminate).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


__all__ = ["ConfigError", "cmd_swarm", "register"]
