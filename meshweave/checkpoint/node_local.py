"""The node-local `local` level (`checkpoint.node_local: true`): each rank's own state on its node's disk.

    <checkpoint.dir as this node sees it>/
      rank_00002/                one rank's checkpoints, in the standard layout (see `layout`)
        step_000000010/          a one-process DCP checkpoint of this rank's local shards (plain tensors),
          node_local.json        its plain state and the replicated state, and the layout that wrote it
        latest

Why per rank rather than one DCP checkpoint per node: DCP writes each replicated tensor once, by any one
rank, and its metadata on rank 0's node only, so a node could not load its share from its own disk. A
rank that keeps its whole local state reads it back without any other node's files. Such a copy only
fits the same layout (world size, and each tensor's local and global shape and placement: the
fingerprint); any other restart resumes from the persistent level, which DCP reshards. Ranks commit
their copies independently, so a step is a candidate only when every rank has committed it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.tensor import DTensor

from meshweave.checkpoint import layout
from meshweave.checkpoint.comms import CheckpointComms
from meshweave.checkpoint.state import Stateful, flatten, split_tensors

if TYPE_CHECKING:
    from meshweave.checkpoint.entries import EntryKinds
    from meshweave.checkpoint.writer import SavePayload

log = logging.getLogger(__name__)
LEVEL = "local"
INFO = "node_local.json"  # {"rank", "world_size", "fingerprint"}
UNREAD_KEYS = ("optimizer",)  # app_state entries left out of the fingerprint (see layout_tensors)


def rank_dir(node_dir: str, rank: int) -> Path:
    return Path(node_dir) / f"rank_{rank:05d}"


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: loading into it fills the DTensor); other tensors as they are."""
    return t.to_local() if isinstance(t, DTensor) else t


def layout_tensors(kinds: EntryKinds, app_state: dict[str, Stateful]) -> dict[str, torch.Tensor]:
    """The tensors whose layout a copy must match, read without side effects: the optimizer's state follows
    the model's sharding, and reading it before the first step would initialise it (DCP takes a step)."""
    entries = {k: app_state[k].state_dict() for k in kinds.dcp_keys if k in app_state and k not in UNREAD_KEYS}
    return split_tensors(flatten(entries))[0]


def fingerprint(tensors: dict[str, torch.Tensor]) -> str:
    """What a rank's local copy must match to be loaded: every key's dtype, local and global shape, placement
    (the keys of `layout_tensors`)."""
    rows = []
    for key in sorted(k for k in tensors if k.split("/", 1)[0] not in UNREAD_KEYS):
        t = tensors[key]
        placed = [str(p) for p in t.placements] if isinstance(t, DTensor) else None
        rows.append([key, str(t.dtype), list(local_tensor(t).shape), list(t.shape), placed])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def info(rank: int, world_size: int, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {"rank": rank, "world_size": world_size, "fingerprint": fingerprint(tensors)}


def rank_payload(payload: SavePayload) -> SavePayload:
    """This rank's part of a checkpoint as a one-process checkpoint: local shards, and its own plain state."""
    return dataclasses.replace(payload, tensors={k: local_tensor(t) for k, t in payload.tensors.items()})


def own_steps(node_dir: str, expect: dict[str, Any]) -> tuple[list[int], int | None]:
    """This rank's committed copies: the steps (newest first) written by the same rank, world size and layout,
    and the newest step of those written under another (None if there is none)."""
    directory = rank_dir(node_dir, expect["rank"])
    fitting, unfit = [], None
    for step in layout.committed_steps(directory):
        try:
            written = json.loads((directory / layout.step_dirname(step) / INFO).read_text())
        except (OSError, ValueError):
            continue  # unreadable: not a candidate (verification would reject it anyway)
        if written == expect:
            fitting.append(step)
        elif unfit is None:
            unfit = step
    return fitting, unfit


def agreed_steps(comms: CheckpointComms, mine: list[int], unfit: int | None) -> tuple[list[int], int | None]:
    """The steps every rank holds a fitting copy of, newest first, and the newest copy any rank holds from
    another layout (the same on every rank)."""
    every = comms.all_gather_json({"fit": mine, "unfit": unfit})
    fits = [e["fit"] for e in every]
    common = set(fits[0]).intersection(*fits[1:])
    short = [rank for rank, steps in enumerate(fits) if set(steps) != common]
    if comms.rank == 0 and short and any(fits):
        newest = {rank: (max(steps) if steps else None) for rank, steps in enumerate(fits)}
        log.warning("node-local checkpoints: the ranks hold different steps (newest per rank: %s); only steps every rank "
                    "holds count (%s)", newest, sorted(common, reverse=True) or "none: the persistent level decides")
    return sorted(common, reverse=True), max((e["unfit"] for e in every if e["unfit"] is not None), default=None)


def ranks_not_seeing(comms: CheckpointComms, directory: str) -> list[int]:
    """The ranks that do not see a file rank 0 just wrote in `directory` (empty: it is shared). Collective."""
    token = comms.broadcast_json(secrets.token_hex(8) if comms.rank == 0 else None)
    probe = Path(directory) / f".meshweave-shared-probe-{token}"
    written = None
    if comms.rank == 0:
        try:
            os.makedirs(directory, exist_ok=True)
            probe.write_text(token)
            written = True
        except OSError:
            written = False  # not this check's business: the first save reports it, naming the rank
    if not comms.broadcast_json(written):  # after rank 0's write: also the barrier before the reads
        return []
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    blind = [rank for rank, ok in enumerate(comms.all_gather_json(seen)) if not ok]
    if comms.rank == 0:
        probe.unlink(missing_ok=True)
    return blind
