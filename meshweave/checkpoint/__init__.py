"""meshweave.checkpoint: lazy asynchronous multi-level checkpointing on top of DCP.

Trainer interface: `Checkpointer(cfg, group, rank, world_size)` with `load_latest`,
`before_optimizer_step`, `after_optimizer_step`, `close`; `ModelState` / `OptimizerState` wrap model
parts and optimizers for it; `CheckpointSettings` / `validate_checkpoint_settings` for the config layer.
"""

from meshweave.checkpoint.checkpointer import CheckpointStats, Checkpointer
from meshweave.checkpoint.entries import CheckpointLoadError
from meshweave.checkpoint.loader import CheckpointFallbackWarning
from meshweave.checkpoint.settings import CheckpointSettings, validate_checkpoint_settings
from meshweave.checkpoint.state import ModelState, OptimizerState, Stateful
from meshweave.checkpoint.writer import CheckpointWriteError

__all__ = [
    "CheckpointFallbackWarning", "CheckpointLoadError", "CheckpointSettings", "CheckpointStats",
    "CheckpointWriteError", "Checkpointer", "ModelState", "OptimizerState", "Stateful",
    "validate_checkpoint_settings",
]
