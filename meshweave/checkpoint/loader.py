"""Choosing the checkpoint to resume from (agreed by all ranks) and loading it.

Candidates are the committed step directories of every disk level, newest first (for equal steps the
faster level first), plus the in-memory snapshot when every rank holds the same one. Rank 0 lists the
candidates and broadcasts them; every rank verifies a strided share of each candidate's files against
its manifest (sizes and CRC32 checksums, read streaming, then contents: see `contents`) and the problem
counts are summed, so all ranks take the same decision: every file a load reads has been checked by some
rank first. `checkpoint.verify: false` skips the checksums (sizes and the small JSON files' contents are
still checked), for storage that checks itself or checkpoints too large to read twice. A candidate with
any problem is skipped with a warning naming the bad files. With `checkpoint.node_local`, the local level's
candidates are the steps every rank holds a fitting copy of (see `node_local`); each rank verifies its
own copy whole. Loading reads DCP's files through `storage.SafeFileSystemReader`: nothing is unpickled.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from meshweave.checkpoint import contents, layout, node_local
from meshweave.checkpoint.comms import CheckpointComms
from meshweave.checkpoint.entries import CheckpointLoadError, EntryKinds, copy_into, restore
from meshweave.checkpoint.settings import CheckpointSettings
from meshweave.checkpoint.state import Stateful, split_tensors
from meshweave.checkpoint.storage import SafeFileSystemReader
from meshweave.checkpoint.writer import SavePayload

log = logging.getLogger(__name__)
MEMORY = "memory"


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint was incomplete or corrupt; an older one is used instead."""


@dataclass(frozen=True)
class Candidate:
    step: int
    level: str
    path: str  # empty for the memory level; for a rank's own copy, this rank's directory
    own: bool = False  # a rank's own copy of the node-local level (see node_local)


def shared_levels(cfg: CheckpointSettings) -> list[str]:
    """The disk levels every rank sees (all of them, but a node-local `local` level)."""
    return [lvl for lvl in cfg.disk_levels() if not (cfg.node_local and lvl == node_local.LEVEL)]


def disk_candidates(cfg: CheckpointSettings) -> list[Candidate]:
    """Committed checkpoints of the shared disk levels, newest first; for one step, levels in flush order."""
    found = [Candidate(step, level, str(Path(cfg.level_dir(level)) / layout.step_dirname(step)))
             for level in shared_levels(cfg) for step in layout.committed_steps(cfg.level_dir(level))]
    return _newest_first(cfg, found)


def _newest_first(cfg: CheckpointSettings, found: list[Candidate]) -> list[Candidate]:
    order = {lvl: i for i, lvl in enumerate(cfg.disk_levels())}
    return sorted(found, key=lambda c: (-c.step, order[c.level]))


def own_copy_candidates(comms: CheckpointComms, cfg: CheckpointSettings, expect: dict[str, Any]
                        ) -> tuple[list[Candidate], int | None]:
    """The node-local steps every rank holds a copy of that fits `expect` (node_local.info), and the newest
    copy of another layout any rank holds; collective."""
    node_dir = cfg.level_dir(node_local.LEVEL)
    steps, unfit = node_local.agreed_steps(comms, *node_local.own_steps(node_dir, expect))
    return [Candidate(step, node_local.LEVEL, str(node_local.rank_dir(node_dir, comms.rank) / layout.step_dirname(step)),
                      own=True) for step in steps], unfit


def verify_share(path: str, rank: int, world_size: int, checksums: bool = True) -> list[str]:
    """Problems in this rank's share (every world_size-th file: sizes, checksums, contents) of a checkpoint;
    manifest problems on every rank, missing files on rank 0. `checksums=False` (`checkpoint.verify: false`)
    skips reading the files for their checksums; sizes and the small files' contents are still checked."""
    try:
        manifest = layout.read_manifest(path)
    except layout.ManifestError as err:
        return [str(err)]
    names = sorted(manifest["files"])[rank::world_size]
    problems = layout.structure_problems(path, manifest) if rank == 0 else []
    return problems + contents.verify(path, manifest, names, checksums)


def choose(comms: CheckpointComms, cfg: CheckpointSettings, memory_step: int | None,
           own_copy: dict[str, Any] | None = None) -> Candidate | None:
    """The newest complete and verified checkpoint, the same step and level on every rank (None if there is
    none). own_copy: what this rank's node-local copies must match (node_local.info), with checkpoint.node_local."""
    mine = -1 if memory_step is None else memory_step
    lo, hi = comms.all_reduce_int(mine, "min"), comms.all_reduce_int(mine, "max")
    memory = Candidate(lo, MEMORY, "") if lo == hi and lo >= 0 else None
    listed = comms.broadcast_json([c.__dict__ for c in disk_candidates(cfg)] if comms.rank == 0 else None)
    own, unfit = own_copy_candidates(comms, cfg, own_copy) if cfg.node_local and own_copy is not None else ([], None)
    chosen = _first_good(comms, cfg, _newest_first(cfg, [Candidate(**c) for c in listed] + own), memory)
    if unfit is not None and (chosen is None or chosen.step < unfit):
        _refuse_or_warn_unfit(comms.rank, unfit, chosen)
    return chosen


def _refuse_or_warn_unfit(rank: int, unfit: int, chosen: Candidate | None) -> None:
    """Node-local copies newer than what can be loaded were written under another layout: they cannot be
    resharded, so going on would silently redo their steps (or start over)."""
    what = (f"checkpoint.dir: the node-local copies up to step {unfit} were written under another layout (world size "
            f"or sharding) and cannot be resharded")
    if chosen is None:
        raise CheckpointLoadError(f"{what}, and no other checkpoint exists; go back to that layout, or set "
                                  f"checkpoint.resume: false to start over")
    if rank == 0:
        log.warning("%s; resuming from the older step %d (%s level)", what, chosen.step, chosen.level)


def _first_good(comms: CheckpointComms, cfg: CheckpointSettings, candidates: list[Candidate],
                memory: Candidate | None) -> Candidate | None:
    """The first candidate that verifies on every rank (the memory snapshot where it is as new)."""
    for cand in candidates:
        if memory is not None and memory.step >= cand.step:
            return memory
        rank, world_size = (0, 1) if cand.own else (comms.rank, comms.world_size)  # a copy: its rank checks it all
        problems = verify_share(cand.path, rank, world_size, checksums=cfg.verify)
        for p in problems:
            log.warning("checkpoint verification: %s", p)
        total = comms.all_reduce_int(len(problems))
        if total == 0:
            return cand
        _warn_fallback(comms.rank, cand, total, problems)
    return memory


def _warn_fallback(rank: int, cand: Candidate, total: int, problems: list[str]) -> None:
    if rank != 0 and not problems:
        return
    shown = "; ".join(problems[:3]) or "see the other ranks' logs"
    msg = (f"checkpoint step {cand.step} at {cand.path} is incomplete or corrupt ({total} problem(s): {shown}); "
           f"falling back to an older checkpoint")
    log.warning(msg)
    warnings.warn(msg, CheckpointFallbackWarning, stacklevel=3)


def load_from_dir(comms: CheckpointComms, kinds: EntryKinds, path: str, app_state: dict[str, Stateful]) -> None:
    """Load a verified checkpoint directory into app_state in place (DCP reshards the tensors)."""
    _load(comms, kinds, path, app_state, own_copy=False)


def load_own_copy(kinds: EntryKinds, path: str, app_state: dict[str, Stateful]) -> None:
    """Load this rank's verified node-local copy (same layout: each local shard from its own saved shard)."""
    _load(CheckpointComms(None, 0, 1), kinds, path, app_state, own_copy=True)


def _load(comms: CheckpointComms, kinds: EntryKinds, path: str, app_state: dict[str, Stateful], own_copy: bool) -> None:
    manifest = layout.read_manifest(path)
    flat = kinds.dcp_flat(app_state)
    tensors, _ = split_tensors(flat)
    # a copy holds local shards: it loads into the DTensors' local tensors (views), one process alone
    targets = {k: node_local.local_tensor(t) for k, t in tensors.items()} if own_copy else tensors
    try:
        dcp.load(targets, storage_reader=SafeFileSystemReader(path), process_group=comms.pg, no_dist=not comms.distributed)
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - DCP raises it on every rank alike
        cause = [line for line in str(err).splitlines() if line.strip()][-1]
        raise CheckpointLoadError(f"checkpoint {path} is intact but does not fit the state being restored "
                                  f"(different model or optimizer?): {cause}") from err
    flat.update(tensors)
    try:  # verified before; read through the same checks in case the files changed since
        replicated = contents.read_plain(Path(path) / layout.REPLICATED_PLAIN, layout.REPLICATED_PLAIN)
        rank_name = layout.per_rank_plain_name(_plain_rank(manifest, comms, path))
        per_rank = contents.read_plain(Path(path) / rank_name, rank_name)
    except (OSError, contents.PlainStateFormatError) as err:
        raise CheckpointLoadError(f"checkpoint {path} changed after it was verified: {err}") from err
    restore(kinds, app_state, flat, replicated["sharded_plain"], replicated["entries"], per_rank["entries"], path)


def _plain_rank(manifest: dict[str, Any], comms: CheckpointComms, path: str) -> int:
    saved = manifest["world_size"]
    if saved == comms.world_size:
        return comms.rank
    if comms.rank == 0:
        log.warning("checkpoint %s was saved by %d ranks, loading on %d: per-rank state (RNG, ...) comes from "
                    "saved rank 0 on every rank", path, saved, comms.world_size)
    return 0


def load_from_memory(kinds: EntryKinds, snapshot: SavePayload, replicated: dict[str, Any],
                     app_state: dict[str, Stateful]) -> None:
    """Restore from this process's host snapshot (same layout; no disk access)."""
    flat = kinds.dcp_flat(app_state)
    tensors, _ = split_tensors(flat)
    copy_into(tensors, snapshot.tensors, f"in-memory checkpoint of step {snapshot.step}")
    restore(kinds, app_state, flat, snapshot.sharded_plain, replicated.get("entries", {}),
            snapshot.per_rank_plain["entries"], f"memory:step {snapshot.step}")
