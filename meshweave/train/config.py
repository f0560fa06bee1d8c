"""Config loading bound to the model registry: what the CLI, the workers and the tests call.

core/config.py does the work; it cannot import models/ (it sits below them), so the lookup from a
`model.kind` to its config dataclass is passed in here. Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from meshweave.core import config as _core
from meshweave.core.config import ConfigError, dump_yaml, to_dict
from meshweave.core.schema import Config
from meshweave.models.registry import model_config_class

__all__ = ["ConfigError", "dump_yaml", "from_dict", "load_config", "to_dict"]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML (or only defaults when path is None), apply `a.b=value` overrides, build the schema."""
    return _core.load_config(path, overrides, model_config_class)


def from_dict(raw: dict[str, Any]) -> Config:
    """The typed config from a plain dict (e.g. the one a launcher hands its workers)."""
    return _core.from_dict(raw, model_config_class)
