"""Cheap re-capture of model/optimizer state dicts between saves.

DCP's `get_model_state_dict` / `get_optimizer_state_dict` re-derive every parameter's name on each
call (milliseconds of Python), yet between two saves the tensors they return are the very same
objects, updated in place by the optimizer. The lazy checkpointer captures them on the training
thread, so that cost is a stall on every save. `LiveStateCache` keeps the first result and reuses
it while an identity fingerprint (object ids and storage pointers of every parameter, buffer and
optimizer-state tensor) is unchanged; anything that replaces a tensor changes the fingerprint and
forces a fresh call. Non-tensor leaves (optimizer hyper-parameters, changed by LR schedules) are
always re-read, from the live param groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

Fingerprint = tuple


def fingerprint(tensors: Iterable[torch.Tensor]) -> Fingerprint:
    return tuple((id(t), _storage_ptr(t)) for t in tensors)


def _storage_ptr(t: torch.Tensor) -> int:
    local = t._local_tensor if isinstance(t, DTensor) else t
    return local.data_ptr()


def model_fingerprint(parts: list[nn.Module]) -> Fingerprint:
    return fingerprint(t for part in parts for t in (*part.parameters(), *part.buffers()))


def optimizer_fingerprint(optimizers: list[torch.optim.Optimizer]) -> Fingerprint:
    tensors = []
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                tensors.append(p)
                tensors += [v for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return fingerprint(tensors)


def hyperparameter_reader(parts: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                          keys: Iterable[str]) -> Callable[[], dict[str, Any]] | None:
    """Reader of the flattened `param_groups.<fqn>.<name>` leaves from the live groups (None if a key is unknown)."""
    group_of: dict[str, dict] = {}
    for part, opt in zip(parts, optimizers):
        by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
        group_of.update({fqn: by_param[id(p)] for fqn, p in part.named_parameters() if id(p) in by_param})
    where: dict[str, tuple[dict, str]] = {}
    for key in keys:
        fqn, _, name = key.removeprefix("param_groups.").rpartition(".")
        if not key.startswith("param_groups.") or fqn not in group_of or name not in group_of[fqn]:
            return None
        where[key] = (group_of[fqn], name)
    return lambda: {key: group[name] for key, (group, name) in where.items()}


class LiveStateCache:
    """Memoises a state-dict function while `current_fingerprint()` is unchanged."""

    def __init__(self, compute: Callable[[], dict[str, Any]], current_fingerprint: Callable[[], Fingerprint],
                 plain_reader: Callable[[dict[str, Any]], Callable[[], dict[str, Any]] | None] | None = None) -> None:
        self.compute, self.current_fingerprint, self.plain_reader = compute, current_fingerprint, plain_reader
        self._key: Fingerprint | None = None
        self._tensors: dict[str, Any] = {}
        self._read_plain: Callable[[], dict[str, Any]] | None = None
        self.hits = 0

    def get(self) -> dict[str, Any]:
        key = self.current_fingerprint()
        if key == self._key and self._read_plain is not None:
            self.hits += 1
            return {**self._tensors, **self._read_plain()}
        fresh = self.compute()
        self._remember(key, fresh)
        return fresh

    def _remember(self, key: Fingerprint, fresh: dict[str, Any]) -> None:
        tensors = {k: v for k, v in fresh.items() if isinstance(v, torch.Tensor)}
        plain = {k: v for k, v in fresh.items() if not isinstance(v, torch.Tensor)}
        reader = self.plain_reader(plain) if self.plain_reader is not None else (lambda: {})
        if plain and self.plain_reader is None:
            reader = None
        # Only cache what we can reproduce exactly: the reader must give DCP's own values back.
        self._key, self._tensors = key, tensors
        self._read_plain = reader if reader is not None and reader() == plain else None

    def invalidate(self) -> None:
        self._key, self._read_plain = None, None
