"""Where are we running? torchrun (or any torch elastic agent), SLURM's srun, or standalone.

SLURM's variables are mapped onto the torch.distributed ones (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so the rest of meshweave only ever reads the latter.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping


@dataclass(frozen=True)
class LaunchEnv:
    kind: str  # "torchrun" | "slurm" | "standalone"
    world_size: int | None  # None for standalone: meshweave decides (--nproc / train.nproc)


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now (for local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect(env: Mapping[str, str] = os.environ) -> LaunchEnv:
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv("torchrun", int(env["WORLD_SIZE"]))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return LaunchEnv("slurm", int(env["SLURM_NTASKS"]))
    return LaunchEnv("standalone", None)


def slurm_to_torch_env(env: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed variables derived from SLURM's (an explicit MASTER_ADDR/PORT wins)."""
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_NTASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(env.get("SLURM_NODELIST", "127.0.0.1")),
        "MASTER_PORT": port,
    }


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: `scontrol show hostnames` when available, else parsed here."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.split()[0]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return expand_nodelist(nodelist)[0]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand SLURM's compact form, e.g. "gpu[01-03,07],login1" -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{len(lo)}d}")
    return hosts
