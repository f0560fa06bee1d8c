"""Writing one checkpoint to a disk level (DCP + plain JSON + manifest + commit) and promoting it.

Every function here runs in the checkpointer's background thread on every rank, in the same order,
and talks only over the dedicated checkpoint group (DCP's own collectives included).
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from meshweave.checkpoint import layout
from meshweave.checkpoint.comms import CheckpointComms
from meshweave.checkpoint.crash import maybe_crash
from meshweave.checkpoint.disk_writer import DiskWriterProcess
from meshweave.checkpoint.storage import SafeFileSystemWriter

log = logging.getLogger(__name__)
# On one process we call DCP without a process group on purpose; its per-call warning about that is noise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written or promoted (the previous checkpoints are untouched)."""


@dataclass
class SavePayload:
    """Everything one rank contributes to one checkpoint (tensors already staged on the host)."""

    step: int
    tensors: dict[str, torch.Tensor]
    per_rank_plain: dict[str, Any]  # JSON-able (codec-encoded)
    replicated_plain: dict[str, Any]  # JSON-able; only rank 0's is written
    sharded_plain: dict[str, Any] = field(default_factory=dict)  # non-tensor leaves of DCP entries


class _RecordingWriter(SafeFileSystemWriter):
    """SafeFileSystemWriter (no pickles) that remembers which files this rank wrote (and can crash right after)."""

    def __init__(self, path: Path, level: str, step: int, rank: int) -> None:
        super().__init__(path, sync_files=True)
        self.written: set[str] = set()
        self._level, self._step, self._rank = level, step, rank

    def write_data(self, plan, planner):
        future = super().write_data(plan, planner)
        future.wait()
        self.written.update(r.storage_data.relative_path for r in future.value())
        maybe_crash(f"write:{self._level}", self._step, self._rank)
        return future


class _ProcessRecordingWriter(_RecordingWriter):
    """The same files, written by the writer process from the shared staging buffers (checkpoint.writer: process).

    The file layout is SafeFileSystemWriter's (each item's raw bytes, in plan order); the writer process
    returns each file's size and CRC32, so they are not read back here. A file holding an item that is
    not in a shared buffer (none is expected) is written here instead, as the thread writer does.
    """

    def __init__(self, path: Path, level: str, step: int, rank: int, disk: DiskWriterProcess) -> None:
        super().__init__(path, level, step, rank)
        self.disk = disk
        self.described: dict[str, dict] = {}

    def write_data(self, plan, planner):
        name = f"{plan.storage_data.prefix}0.distcp"
        pieces, results, offset = [], [], 0
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                return super().write_data(plan, planner)  # refused there, with the message
            data = planner.resolve_data(item).detach()
            where = self.disk.buffers.locate(data)
            if where is None or (item.tensor_data is not None and data.shape != item.tensor_data.chunk.sizes):
                return super().write_data(plan, planner)
            pieces.append(where)
            results.append(WriteResult(index=item.index, size_in_bytes=where[2],
                                       storage_data=_StorageInfo(name, offset, where[2])))
            offset += where[2]
        size, crc = self.disk.write(Path(self.path) / name, pieces, fsync=self.sync_files)
        self.described[name] = {"size": size, "crc32": crc, "rank": self._rank}
        self.written.add(name)
        maybe_crash(f"write:{self._level}", self._step, self._rank)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future


class LevelWriter:
    """Writes checkpoints into disk levels for one rank; rank 0 commits.

    disk: the writer process (checkpoint.writer: process) that writes the data files and copies files
    between levels; None writes them in the calling (background) thread.
    """

    def __init__(self, comms: CheckpointComms, keep: int, disk: DiskWriterProcess | None = None) -> None:
        self.comms, self.keep, self.disk = comms, keep, disk
        self.rank, self.world_size = comms.rank, comms.world_size

    # --- first disk level: DCP ---------------------------------------------------------
    def write_dcp(self, level: str, level_dir: str, payload: SavePayload, extra_json: dict[str, Any] | None = None) -> Path:
        """Write `payload` as a committed checkpoint in `level_dir`; return the committed directory.
        `extra_json`: more files ({name: JSON-able}) that rank 0 writes into it, listed in the manifest.

        Every local part (directories, JSON files, checksums, rank 0's commit) ends in an agreement on
        its outcome, so a part that fails on some ranks fails the save on all of them at the same point
        (see `_agreed`); DCP's own parts agree by themselves (CheckpointException on every rank).
        """
        step = payload.step
        tmp = self._prepare_tmp(level_dir, step)
        with self._agreed(step, f"writing the plain state to {tmp}"):
            own = {layout.per_rank_plain_name(self.rank): _write_json(tmp, layout.per_rank_plain_name(self.rank), payload.per_rank_plain)}
        writer = _RecordingWriter(tmp, level, step, self.rank) if self.disk is None else \
            _ProcessRecordingWriter(tmp, level, step, self.rank, self.disk)
        try:
            dcp.save(payload.tensors, storage_writer=writer, process_group=self.comms.pg, no_dist=not self.comms.distributed)
        except CheckpointException as err:  # a BaseException in DCP; raised on every rank alike
            raise CheckpointWriteError(f"step {step}: DCP save to {tmp} failed: {err}") from err
        with self._agreed(step, f"checksumming the files in {tmp}"):
            described = getattr(writer, "described", {})
            own.update({name: described.get(name) or _describe(tmp / name, self.rank) for name in writer.written})
        gathered = self.comms.all_gather_json({"files": own, "sharded_plain": payload.sharded_plain})
        final = Path(level_dir) / layout.step_dirname(step)
        # The agreement doubles as the barrier: later levels and the next save may rely on the commit.
        with self._agreed(step, f"committing {final}"):
            if self.rank == 0:
                files = _merge_files(gathered)
                replicated = dict(payload.replicated_plain, sharded_plain=_merge_plain(gathered))
                files[layout.REPLICATED_PLAIN] = _write_json(tmp, layout.REPLICATED_PLAIN, replicated)
                files.update({name: _write_json(tmp, name, obj, rank=0) for name, obj in (extra_json or {}).items()})
                files.update(_describe_unclaimed(tmp, files))
                self._commit(level, level_dir, tmp, final, step, files)
        return final

    def write_own_copy(self, level: str, level_dir: str, payload: SavePayload, extra_json: dict[str, Any]) -> Path:
        """Write this rank's payload alone, as a one-process checkpoint in `level_dir` (the node-local level,
        see `node_local`); the outcome is agreed over the group like every other part of a save."""
        alone = LevelWriter(CheckpointComms(None, 0, 1), self.keep, self.disk)
        with self._agreed(payload.step, f"writing rank {self.rank}'s own copy in {level_dir}"):
            committed = alone.write_dcp(level, level_dir, payload, extra_json)
        return committed

    # --- further disk levels: copy a committed checkpoint ------------------------------
    def promote(self, level: str, src_dir: Path, level_dir: str, step: int) -> Path:
        """Copy a committed checkpoint into another level (each rank copies its own files), then commit."""
        tmp = self._prepare_tmp(level_dir, step)
        manifest: dict = {}
        try:
            manifest = layout.read_manifest(src_dir)
            mine = [n for n, meta in manifest["files"].items() if meta.get("rank", 0) == self.rank]
            problems = _copy_verified(src_dir, tmp, {n: manifest["files"][n] for n in mine}, self.disk)
        except Exception as err:  # noqa: BLE001 - agreed below: no rank may leave before the others know
            problems = [f"{type(err).__name__}: {err}"]
        maybe_crash(f"write:{level}", step, self.rank)
        for p in problems:
            log.error("checkpoint promotion to %s: %s", level, p)
        if self.comms.all_reduce_int(len(problems)) > 0:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(f"step {step}: copy {src_dir} -> {level_dir} failed verification (see log)")
        final = Path(level_dir) / layout.step_dirname(step)
        with self._agreed(step, f"committing {final}"):
            if self.rank == 0:
                self._commit(level, level_dir, tmp, final, step, manifest["files"], world_size=manifest["world_size"])
        return final

    # --- shared steps ------------------------------------------------------------------
    def _prepare_tmp(self, level_dir: str, step: int) -> Path:
        tmp = Path(level_dir) / layout.tmp_dirname(step)
        # nobody writes into tmp before rank 0 has (re)created it: the agreement is also the barrier
        with self._agreed(step, f"preparing {tmp}"):
            if self.rank == 0:
                os.makedirs(level_dir, exist_ok=True)
                layout.remove_stale_tmp(level_dir)
                (tmp / "plain").mkdir(parents=True)
        return tmp

    @contextmanager
    def _agreed(self, step: int, what: str) -> Iterator[None]:
        """Run a local part of a save, then agree on its outcome with one all-gather over the group.

        A rank whose part failed re-raises its own error; every other rank raises CheckpointWriteError
        naming the failed rank and its error (chained to an equal OSError, so a filesystem failure
        reads as one on every rank). Without it, a rank failing alone (a directory replaced by a file
        under one rank's feet) would leave the others waiting in the save's next collective for a rank
        that never comes, while its training thread may be waiting for theirs (see tests/test_checkpoint_write_failure.py).
        """
        error: Exception | None = None
        try:
            yield
        except Exception as err:  # noqa: BLE001 - every failure is shared before it is raised
            error = err
        outcomes = self.comms.all_gather_json(_outcome(error))
        if error is not None:
            raise error
        failed = [(rank, o) for rank, o in enumerate(outcomes) if o is not None]
        if failed:
            rank, o = failed[0]
            cause = OSError(o["errno"], o["strerror"], o["filename"]) if o["errno"] is not None else None
            others = f" (and rank(s) {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
            raise CheckpointWriteError(f"step {step}: {what} failed on rank {rank}{others}: "
                                       f"{o['type']}: {o['message']}") from cause

    def _commit(self, level: str, level_dir: str, tmp: Path, final: Path, step: int,
                files: dict[str, dict], world_size: int | None = None) -> None:
        maybe_crash(f"before_manifest:{level}", step, self.rank)
        layout.write_manifest(tmp, step, world_size or self.world_size, level, files)
        maybe_crash(f"after_manifest:{level}", step, self.rank)
        layout.commit_dir(tmp, final)
        maybe_crash(f"before_pointer:{level}", step, self.rank)
        layout.write_pointer(level_dir, step)
        maybe_crash(f"before_retention:{level}", step, self.rank)
        removed = layout.apply_retention(level_dir, self.keep)
        log.info("checkpoint step %d committed to %s (%s)%s", step, final, level,
                 f"; removed steps {removed}" if removed else "")


def _outcome(err: BaseException | None) -> dict | None:
    """A failure as JSON for the other ranks (None for success); an OSError keeps its errno and file name."""
    if err is None:
        return None
    is_os = isinstance(err, OSError) and err.errno is not None
    return {"type": type(err).__name__, "message": str(err), "errno": err.errno if is_os else None,
            "strerror": err.strerror if is_os else None,
            "filename": None if not is_os or err.filename is None else os.fsdecode(err.filename)}


def _write_json(ckpt_dir: Path, name: str, obj: Any, rank: int | None = None) -> dict:
    import json

    path = ckpt_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    if rank is None:
        rank = 0 if name == layout.REPLICATED_PLAIN else _rank_of(name)
    return _describe(path, rank)


def _rank_of(name: str) -> int:
    return int(name.rsplit("_", 1)[1].split(".")[0])


def _describe(path: Path, rank: int) -> dict:
    size, crc = layout.file_checksum(path)
    return {"size": size, "crc32": crc, "rank": rank}


def _describe_unclaimed(tmp: Path, claimed: dict[str, dict]) -> dict[str, dict]:
    """Files no rank reported (DCP's .metadata, written by the coordinator): rank 0 vouches for them."""
    out = {}
    for path in sorted(tmp.rglob("*")):
        name = path.relative_to(tmp).as_posix()
        if path.is_file() and name not in claimed:
            out[name] = _describe(path, rank=0)
    return out


def _merge_files(gathered: list[dict]) -> dict[str, dict]:
    files: dict[str, dict] = {}
    for entry in gathered:
        files.update(entry["files"])
    return files


def _merge_plain(gathered: list[dict]) -> dict[str, Any]:
    """Union of every rank's non-tensor leaves (pipeline stages own different keys; shared keys agree)."""
    merged: dict[str, Any] = {}
    for entry in gathered:
        for key, value in entry["sharded_plain"].items():
            merged.setdefault(key, value)
    return merged


def _copy_verified(src_dir: Path, dst_dir: Path, files: dict[str, dict], disk: DiskWriterProcess | None = None) -> list[str]:
    """Copy files (here, or by the writer process), checking each against the manifest while copying
    (a corrupt source is not promoted)."""
    problems = []
    for name, expect in files.items():
        src, dst = src_dir / name, dst_dir / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            size, crc = _copy_with_crc(src, dst) if disk is None else disk.copy(src, dst)
        except OSError as err:
            problems.append(f"{src}: {err}")
            continue
        if size != expect["size"] or crc != expect["crc32"]:
            problems.append(f"{src}: size/crc {size}/{crc} != manifest {expect['size']}/{expect['crc32']}")
    return problems


def _copy_with_crc(src: Path, dst: Path) -> tuple[int, str]:
    crc, size = 0, 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
            fout.write(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    return size, f"{crc:08x}"
