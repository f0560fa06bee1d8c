"""All of a SWARM run on this machine from one `meshweave train`: the coordinator here, peers as processes.

A demo and a test bed: the peers are the same `meshweave swarm peer` processes a cluster would run,
started with MESHWEAVE_SWARM_INDEX=i so a fault drill can target one of them. The coordinator listens
on a free loopback port (fault_tolerance.coordinator matters only when peers run elsewhere).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from meshweave.core.schema import Config
from meshweave.launch.env import free_port
from meshweave.swarm.coordinator import Coordinator, SwarmStopped
from meshweave.train.config import dump_yaml


def run_local(cfg: Config) -> int:
    """Coordinator + sum(fault_tolerance.peers) peer processes; the coordinator's status is the run's."""
    cfg.fault_tolerance.coordinator = f"127.0.0.1:{free_port()}"
    swarm_dir = Path(cfg.run_dir) / "swarm"
    swarm_dir.mkdir(parents=True, exist_ok=True)
    config_path = swarm_dir / "config.yaml"
    config_path.write_text(dump_yaml(cfg))
    print(f"meshweave swarm: {cfg.fault_tolerance.stages} stages, peers {cfg.fault_tolerance.peers}; "
          f"logs and ledger in {swarm_dir.resolve()}", flush=True)
    coordinator = Coordinator(cfg)
    peers = [_start_peer(config_path, i, swarm_dir) for i in range(sum(cfg.fault_tolerance.peers))]
    try:
        return coordinator.run()
    except SwarmStopped as err:
        print(f"meshweave: swarm error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        for proc in peers:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _start_peer(config_path: Path, index: int, swarm_dir: Path) -> subprocess.Popen:
    env = dict(os.environ, MESHWEAVE_SWARM_INDEX=str(index), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(swarm_dir / f"peer-index{index}.log", "ab") as log:  # the child keeps its own copy of the fd
        return subprocess.Popen([sys.executable, "-m", "meshweave", "swarm", "peer", str(config_path)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
