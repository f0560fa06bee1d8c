"""The registry of model kinds: `model: {kind: NAME, ...}` in a config picks one.

Config classes are torch-free and imported here directly (config loading must stay fast); a kind's
spec, which imports torch and the module, is imported only when asked for. A test or a user's
package adds a kind with `register_model`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from meshweave.models.linear_llama.config import HybridConfig, LinearLlamaConfig
from meshweave.models.llama.config import LlamaConfig
from meshweave.models.st_dit.config import STDiTConfig

if TYPE_CHECKING:
    from meshweave.models.spec import ModelSpec

DEFAULT_KIND = "llama"
# kind -> (config dataclass, "module:attribute" of its ModelSpec)
_KINDS: dict[str, tuple[type, str]] = {
    "llama": (LlamaConfig, "meshweave.models.llama.spec:SPEC"),
    "linear_llama": (LinearLlamaConfig, "meshweave.models.linear_llama.spec:LINEAR_LLAMA_SPEC"),
    "hybrid": (HybridConfig, "meshweave.models.linear_llama.spec:HYBRID_SPEC"),
    "st_dit": (STDiTConfig, "meshweave.models.st_dit.spec:SPEC"),
}


def register_model(kind: str, config_cls: type, spec_path: str) -> None:
    """Add (or replace) a model kind: its config dataclass (with a `kind` field) and where its spec lives."""
    _KINDS[kind] = (config_cls, spec_path)


def model_kinds() -> list[str]:
    return sorted(_KINDS)


def _entry(kind: str) -> tuple[type, str]:
    if kind not in _KINDS:
        shown = kind if len(kind) <= 40 else kind[:40] + "..."
        raise KeyError(f"unknown model kind {shown!r}; known kinds: {', '.join(model_kinds())}")
    return _KINDS[kind]


def model_config_class(kind: str) -> type:
    """The config dataclass of `kind`; KeyError naming the known kinds if there is none."""
    return _entry(kind)[0]


def model_spec(kind: str) -> ModelSpec:
    """The spec of `kind` (imports its module on first use)."""
    module, _, attribute = _entry(kind)[1].partition(":")
    return getattr(importlib.import_module(module), attribute)
