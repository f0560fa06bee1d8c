"""Stateful wrappers for model and optimizer, and the split of a state dict into tensors and plain values.

`ModelState` / `OptimizerState` expose DCP-style state dicts (sharded DTensors under FSDP2/TP, keyed by
the model's global parameter names) for a list of model parts, so that pipeline stages never collide and a
checkpoint loads under another layout. The optimizer state is flattened (`state.<fqn>.<key>`,
`param_groups.<fqn>.<key>`) so it no longer depends on how parameters were grouped per stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from meshweave.checkpoint.live_cache import (LiveStateCache, hyperparameter_reader, model_fingerprint,
                                             optimizer_fingerprint)

SEP = "/"  # joins nested dict keys; fqns use ".", so "/" never collides with them


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class ModelState:
    """The parameters and buffers of one or more model parts (pipeline stages) as one flat state dict."""

    def __init__(self, model_parts: list[nn.Module]) -> None:
        self.model_parts = list(model_parts)
        self.cache = LiveStateCache(self._compute, lambda: model_fingerprint(self.model_parts))

    def state_dict(self) -> dict[str, Any]:
        """Merged `get_model_state_dict` of every part; tensors are references, not copies."""
        return self.cache.get()

    def _compute(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part in self.model_parts:
            merged.update(get_model_state_dict(part))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load every part from the merged dict; each part takes the keys it owns."""
        self.cache.invalidate()
        for part in self.model_parts:
            set_model_state_dict(part, state_dict, options=StateDictOptions(strict=False))


class OptimizerState:
    """The optimizer state of (model part, optimizer) pairs, flattened by parameter name.

    Either one optimizer per model part, or one optimizer over all parts (e.g. several virtual
    pipeline stages on one rank): then the parts are viewed as one module with their original names.
    """

    _OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, model_parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]) -> None:
        if len(optimizers) == 1 and len(model_parts) > 1:
            model_parts = [merged_view(model_parts)]
        if len(model_parts) != len(optimizers):
            raise ValueError(f"{len(model_parts)} model parts but {len(optimizers)} optimizers: give one per part, "
                             f"or one for all parts")
        self.model_parts, self.optimizers = list(model_parts), list(optimizers)
        # DCP names optimizer state through the model's parameters: both identities key the cache.
        self.cache = LiveStateCache(self._compute,
                                    lambda: optimizer_fingerprint(self.optimizers) + model_fingerprint(self.model_parts),
                                    lambda plain: hyperparameter_reader(self.model_parts, self.optimizers, plain))

    def state_dict(self) -> dict[str, Any]:
        """Merged flattened `get_optimizer_state_dict` of every pair (hyper-parameters always current)."""
        return self.cache.get()

    def _compute(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for part, opt in zip(self.model_parts, self.optimizers):
            merged.update(get_optimizer_state_dict(part, opt, options=self._OPTIONS))
        return merged

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load every pair from the merged flattened dict."""
        self.cache.invalidate()
        for part, opt in zip(self.model_parts, self.optimizers):
            set_optimizer_state_dict(part, opt, optim_state_dict=state_dict, options=self._OPTIONS)


def merged_view(parts: list[nn.Module]) -> nn.Module:
    """One module holding the parts' submodules (shared, not copied) under their original names.

    Pipeline stages keep the full model's names ("layers.3...") and each submodule lives in one
    stage, so the union of the stages' module trees is a module whose parameter names are global.
    """
    root = nn.Module()
    _merge_into(root, parts)
    return root


def _merge_into(dst: nn.Module, modules: list[nn.Module]) -> None:
    for m in modules:
        dst._parameters.update({k: v for k, v in m._parameters.items() if v is not None})
        dst._buffers.update({k: v for k, v in m._buffers.items() if v is not None})
    names = list(dict.fromkeys(n for m in modules for n, c in m._modules.items() if c is not None))
    for name in names:
        children = [m._modules[name] for m in modules if m._modules.get(name) is not None]
        if len(children) == 1:
            dst._modules[name] = children[0]
        else:
            dst._modules[name] = nn.Module()
            _merge_into(dst._modules[name], children)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested string-keyed dicts -> {"a/b/c": leaf}; lists, tuples and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if not isinstance(key, str) or SEP in key:
            raise ValueError(f"state dict key {key!r} under {prefix!r} must be a string without {SEP!r}")
        path = f"{prefix}{SEP}{key}" if prefix else key
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, path))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Invert `flatten`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(SEP)
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def split_tensors(flat: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Separate tensor leaves (stored with DCP) from plain leaves (stored as JSON)."""
    tensors = {k: v for k, v in flat.items() if isinstance(v, torch.Tensor)}
    plain = {k: v for k, v in flat.items() if not isinstance(v, torch.Tensor)}
    _reject_nested_tensors(plain)
    return tensors, plain


def _reject_nested_tensors(plain: Mapping[str, Any]) -> None:
    for key, value in plain.items():
        if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in _walk(value)):
            raise ValueError(f"state {key!r} holds tensors inside a list; use a dict so they can be sharded")


def _walk(values: Iterable[Any]) -> Iterable[Any]:
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _walk(v)
        else:
            yield v
