"""What every rank runs: join the process group from the environment, build, train, tear down."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from meshweave.train.build import build_trainer
from meshweave.train.config import from_dict
from meshweave.core.mesh import backend_for, device_type_for


def run_worker(cfg_dict: dict[str, Any]) -> list[float]:
    """Train with the config on this rank; RANK/WORLD_SIZE/MASTER_* must be set. Returns step losses."""
    cfg = from_dict(cfg_dict)
    backend = backend_for(device_type_for(cfg.train.device))
    dist.init_process_group(backend, timeout=timedelta(seconds=int(os.environ.get("MESHWEAVE_PG_TIMEOUT", "300"))))
    try:
        trainer = build_trainer(cfg, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
        return trainer.train()
    finally:
        dist.destroy_process_group()
