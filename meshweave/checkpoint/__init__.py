"""meshweave.checkpoint: lazy asynchronous multi-level checkpointing on top of DCP.

Trainer interface: `Checkpointer(cfg, group, rank, world_size)` with `load_latest`,
`before_optimizer_step`, `after_optimizer_step`, `close`; `ModelState` / `OptimizerState` wrap model
parts and optimizers for it; `CheckpointSettings` / `validate_checkpoint_settings` for the config layer.
"""

import importlib
from typing import Any

# name -> submodule, resolved on first access (PEP 562) so that config validation can import
# `meshweave.checkpoint.settings` without loading torch.
_EXPORTS = {
    "CheckpointStats": "checkpointer", "Checkpointer": "checkpointer", "CheckpointLoadError": "entries",
    "CheckpointFallbackWarning": "loader", "CheckpointSettings": "settings", "validate_checkpoint_settings": "settings",
    "ModelState": "state", "OptimizerState": "state", "Stateful": "state", "CheckpointWriteError": "writer",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'meshweave.checkpoint' has no attribute {name!r}")
    return getattr(importlib.import_module(f"meshweave.checkpoint.{_EXPORTS[name]}"), name)


__all__ = [
    "CheckpointFallbackWarning", "CheckpointLoadError", "CheckpointSettings", "CheckpointStats",
    "CheckpointWriteError", "Checkpointer", "ModelState", "OptimizerState", "Stateful",
    "validate_checkpoint_settings",
]
