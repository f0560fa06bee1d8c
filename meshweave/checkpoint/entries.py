"""How each `app_state` entry is stored: sharded tensors (DCP), replicated plain state, per-rank plain state.

- DCP entries ("model", "optimizer"): tensor leaves go to DCP (layout-independent, resharded on load);
  their non-tensor leaves (optimizer hyper-parameters) go to JSON, merged over ranks by rank 0.
- replicated entries ("data"): identical on every rank; rank 0's copy is saved once and every rank
  gets it back on load (the sampler reshards its own position when the dp degree changed).
- every other entry ("trainer"): per-rank JSON (RNG states may differ per rank); loaded by the same
  rank, or from rank 0's copy when the world size changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from meshweave.checkpoint import codec
from meshweave.checkpoint.state import Stateful, flatten, split_tensors, unflatten
from meshweave.checkpoint.writer import SavePayload

log = logging.getLogger(__name__)


class CheckpointLoadError(RuntimeError):
    """A verified checkpoint does not fit the state being restored (e.g. a different model)."""


@dataclass(frozen=True)
class EntryKinds:
    """Which app_state keys are DCP-sharded and which are replicated; the rest are per-rank."""

    dcp_keys: tuple[str, ...] = ("model", "optimizer")
    replicated_keys: tuple[str, ...] = ("data",)

    def dcp_flat(self, app_state: dict[str, Stateful]) -> dict[str, Any]:
        """Flattened state of the DCP entries ("model/<fqn>" -> value); tensors are live references."""
        return flatten({k: app_state[k].state_dict() for k in self.dcp_keys if k in app_state})

    def plain_keys(self, app_state: dict[str, Stateful]) -> tuple[list[str], list[str]]:
        replicated = [k for k in app_state if k in self.replicated_keys]
        per_rank = [k for k in app_state if k not in self.dcp_keys and k not in self.replicated_keys]
        return replicated, per_rank


def capture(kinds: EntryKinds, step: int, app_state: dict[str, Stateful], rank: int, replicated_everywhere: bool = False
            ) -> tuple[dict[str, torch.Tensor], SavePayload]:
    """Snapshot the small state now and collect references to the tensors to copy lazily.

    Returns (live tensor leaves, payload whose `tensors` is still empty). The replicated state is
    captured on rank 0 only, unless `replicated_everywhere` (each rank writes a whole copy of its own).
    """
    tensors, plain = split_tensors(kinds.dcp_flat(app_state))
    replicated, per_rank = kinds.plain_keys(app_state)
    payload = SavePayload(
        step=step,
        tensors={},
        per_rank_plain={"rank": rank, "entries": {k: codec.encode(app_state[k].state_dict()) for k in per_rank}},
        replicated_plain={"entries": {k: codec.encode(app_state[k].state_dict()) for k in replicated}} if rank == 0 or replicated_everywhere else {},
        sharded_plain={k: codec.encode(v) for k, v in plain.items()},
    )
    return tensors, payload


def restore(kinds: EntryKinds, app_state: dict[str, Stateful], loaded_flat: dict[str, Any],
            sharded_plain: dict[str, Any], replicated: dict[str, Any], per_rank: dict[str, Any], where: str) -> None:
    """Load every app_state entry from already-loaded tensors and decoded-on-the-fly plain state."""
    _, plain_now = split_tensors(loaded_flat)
    for key in plain_now:
        if key in sharded_plain:
            loaded_flat[key] = codec.decode(sharded_plain[key])
        else:
            log.warning("checkpoint %s has no value for %r; keeping the current one", where, key)
    tree = unflatten(loaded_flat)
    for key in kinds.dcp_keys:
        if key in app_state:
            app_state[key].load_state_dict(tree.get(key, {}))
    rep_keys, rank_keys = kinds.plain_keys(app_state)
    for key, source in [(k, replicated) for k in rep_keys] + [(k, per_rank) for k in rank_keys]:
        if key not in source:
            raise CheckpointLoadError(f"checkpoint {where} holds no state for {key!r} (saved: {sorted(source)})")
        app_state[key].load_state_dict(codec.decode(source[key]))


def copy_into(targets: dict[str, torch.Tensor], sources: dict[str, torch.Tensor], where: str) -> None:
    """Copy host snapshot tensors into the live tensors (same layout: local shard to local shard)."""
    missing = sorted(set(targets) - set(sources))
    if missing:
        raise CheckpointLoadError(f"{where} lacks tensors {missing[:5]}{'...' if len(missing) > 5 else ''}")
    for key, dst in targets.items():
        d, s = _local(dst), _local(sources[key])
        if d.shape != s.shape or d.dtype != s.dtype:
            raise CheckpointLoadError(f"{where}: {key} is {tuple(s.shape)} {s.dtype}, expected {tuple(d.shape)} {d.dtype}")
        with torch.no_grad():
            d.copy_(s)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t
