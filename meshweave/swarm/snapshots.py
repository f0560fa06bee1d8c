"""Stage snapshots: what lets a SWARM run survive a stage losing every peer.

Every `snapshot_every` committed steps one peer per stage (the plan names it) writes its stage's
weights and AdamW state to RUN_DIR/swarm/stages/stage<s>-step<t>.pt (torch.save of tensors, read back
with weights_only=True; written to a temporary name and renamed). When a stage is left without peers
the coordinator pauses until a peer joins, then rolls every stage back to the newest step that all
stages saved: the steps after it are redone from the same data, so exactly-once still holds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

KEEP = 2  # snapshots kept per stage
_NAME = re.compile(r"stage(\d+)-step(\d+)\.pt$")


def snapshot_dir(run_dir: str) -> Path:
    return Path(run_dir) / "swarm" / "stages"


def save(run_dir: str, stage: int, step: int, tensors: list[torch.Tensor]) -> None:
    folder = snapshot_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"stage{stage}-step{step}.pt"
    torch.save([t.detach().cpu() for t in tensors], str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    for old in sorted(saved_steps(run_dir).get(stage, []))[:-KEEP]:
        (folder / f"stage{stage}-step{old}.pt").unlink(missing_ok=True)


def load(run_dir: str, stage: int, step: int) -> list[torch.Tensor]:
    return torch.load(snapshot_dir(run_dir) / f"stage{stage}-step{step}.pt", weights_only=True)


def saved_steps(run_dir: str) -> dict[int, list[int]]:
    found: dict[int, list[int]] = {}
    folder = snapshot_dir(run_dir)
    if folder.exists():
        for path in folder.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.setdefault(int(match.group(1)), []).append(int(match.group(2)))
    return found


def newest_common_step(run_dir: str, stages: int) -> int:
    """The newest step for which every stage has a snapshot; 0 (the seeded initial weights, which every peer
    can rebuild) when there is none."""
    steps = saved_steps(run_dir)
    common = set.intersection(*(set(steps.get(s, [])) for s in range(stages))) if stages else set()
    return max(common, default=0)
