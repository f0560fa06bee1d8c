"""On-disk layout of a checkpoint level directory, and its commit protocol.

    <level dir>/
      step_000000010/            a committed checkpoint (renamed into place only when complete)
        .metadata, __0_0.distcp  DCP files (tensors; layout-independent, resharded on load), written
                                 by `storage`: JSON metadata and raw tensor bytes, never pickles
        plain/replicated.json    rank-0 state (data position, optimizer hyper-parameters), JSON
        plain/rank_00000.json    per-rank small state (RNG, step, scheduler), JSON
        manifest.json            written last: step, world size, every file's size and CRC32
      .tmp-step_000000012/       a save in progress (or one killed mid-way: ignored, then removed)
      latest                     JSON {"step": 10, "dir": "step_000000010"}, moved after commit

A manifest's checksums detect damage, not forgery: `contents` also checks what each file holds.

Commit order: data files (fsynced by DCP) -> plain JSON -> manifest (tmp + fsync + rename) ->
rename of the directory (+ fsync of the parent) -> `latest` -> removal of old checkpoints. A crash
at any point leaves either an ignored `.tmp-*` directory or a complete committed one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import Any

FORMAT = "meshweave-ckpt/1"
MANIFEST = "manifest.json"
POINTER = "latest"
DCP_METADATA = ".metadata"
_STEP_DIR = re.compile(r"^step_(\d{9})$")
_CHUNK = 1 << 22


class ManifestError(ValueError):
    """A manifest is missing, unreadable or not one of ours."""


def step_dirname(step: int) -> str:
    return f"step_{step:09d}"


def tmp_dirname(step: int) -> str:
    return f".tmp-{step_dirname(step)}"


def per_rank_plain_name(rank: int) -> str:
    return f"plain/rank_{rank:05d}.json"


REPLICATED_PLAIN = "plain/replicated.json"


def file_checksum(path: str | Path) -> tuple[int, str]:
    """(size in bytes, CRC32 as 8 hex digits) of a file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, f"{crc:08x}"


def fsync_dir(path: str | Path) -> None:
    """Make a rename or creation inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file so that readers see either the old or the whole new content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_manifest(ckpt_dir: str | Path, step: int, world_size: int, level: str, files: dict[str, dict]) -> None:
    """Write manifest.json (last, atomically) listing every data file's size and checksum."""
    import torch

    manifest = {
        "format": FORMAT, "step": step, "world_size": world_size, "level": level,
        "created_unix": time.time(), "torch_version": torch.__version__,
        "files": dict(sorted(files.items())),
    }
    atomic_write_text(Path(ckpt_dir) / MANIFEST, json.dumps(manifest, indent=1))


def read_manifest(ckpt_dir: str | Path) -> dict[str, Any]:
    """Parse and sanity-check a checkpoint's manifest; raise ManifestError when unusable."""
    path = Path(ckpt_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: missing (the save never committed)") from None
    except (OSError, ValueError) as err:
        raise ManifestError(f"{path}: unreadable ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a {FORMAT} manifest")
    problem = _manifest_problem(manifest)
    if problem:
        raise ManifestError(f"{path}: malformed ({problem})")
    return manifest


def _manifest_problem(manifest: dict[str, Any]) -> str | None:
    """What makes a parsed manifest unusable (wrong types, unsafe file names), or None."""
    if not isinstance(manifest.get("files"), dict) or not _is_count(manifest.get("step")):
        return "no step or file list"
    if not _is_count(manifest.get("world_size")) or manifest["world_size"] < 1:
        return "no world size"
    for name, meta in manifest["files"].items():
        if not is_safe_name(name):
            return f"file name {name!r} is not a relative path inside the checkpoint"
        if not isinstance(meta, dict) or not _is_count(meta.get("size")) or not isinstance(meta.get("crc32"), str) \
                or not _is_count(meta.get("rank", 0)):
            return f"the entry of {name} is not {{size, crc32, rank}}"
    return None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def is_safe_name(name: str) -> bool:
    """A relative POSIX path with no empty, "." or ".." part (it cannot leave the checkpoint directory)."""
    return bool(name) and "\\" not in name and not name.startswith("/") and \
        all(part not in ("", ".", "..") for part in name.split("/"))


def verify_files(ckpt_dir: str | Path, manifest: dict[str, Any], names: list[str] | None = None) -> list[str]:
    """Problems found checking the listed files (default: all, plus completeness) against the manifest.

    Sizes and checksums only: `contents.verify` also checks what the files hold.
    """
    files = manifest["files"]
    problems = structure_problems(ckpt_dir, manifest) if names is None else []
    for name in files if names is None else names:
        problems += verify_one(ckpt_dir, name, files[name])
    return problems


def structure_problems(ckpt_dir: str | Path, manifest: dict[str, Any]) -> list[str]:
    """Files a checkpoint needs that its manifest does not list: DCP metadata, and the plain state of every rank."""
    needed = [DCP_METADATA, REPLICATED_PLAIN] + [per_rank_plain_name(r) for r in range(manifest["world_size"])]
    return [f"{ckpt_dir}: manifest lists no {name} (a checkpoint needs it)" for name in needed
            if name not in manifest["files"]]


def verify_one(ckpt_dir: str | Path, name: str, expect: dict[str, Any], checksum: bool = True) -> list[str]:
    """Problems of one file against its manifest entry: missing, wrong size or (with `checksum`: the file is
    read once, streaming) wrong checksum."""
    path = Path(ckpt_dir) / name
    if not path.is_file():
        return [f"{path}: missing"]
    size = path.stat().st_size
    if size != expect["size"]:
        return [f"{path}: size {size} bytes, manifest says {expect['size']} (truncated or overwritten)"]
    if not checksum:
        return []
    _, crc = file_checksum(path)
    if crc != expect["crc32"]:
        return [f"{path}: checksum {crc} != manifest {expect['crc32']} (corrupted)"]
    return []


def commit_dir(tmp_dir: str | Path, final_dir: str | Path) -> None:
    """Atomically rename a finished checkpoint into place, replacing a stale one of the same step."""
    final_dir = Path(final_dir)
    if final_dir.exists():  # e.g. a re-save of a step after falling back past a corrupt copy of it
        trash = final_dir.with_name(f".trash-{final_dir.name}-{os.getpid()}")
        os.replace(final_dir, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)


def write_pointer(level_dir: str | Path, step: int) -> None:
    """Move `latest` to a committed step."""
    atomic_write_text(Path(level_dir) / POINTER, json.dumps({"step": step, "dir": step_dirname(step)}))


def read_pointer(level_dir: str | Path) -> int | None:
    """The step `latest` points at, or None if there is no readable pointer."""
    try:
        value = json.loads((Path(level_dir) / POINTER).read_text())
        return int(value["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def committed_steps(level_dir: str | Path) -> list[int]:
    """Steps of the committed checkpoint directories in a level, newest first."""
    try:
        names = os.listdir(level_dir)
    except FileNotFoundError:
        return []
    steps = [int(m.group(1)) for n in names if (m := _STEP_DIR.match(n))]
    return sorted(steps, reverse=True)


def remove_stale_tmp(level_dir: str | Path) -> None:
    """Remove `.tmp-*` / `.trash-*` leftovers of saves killed mid-way (no save is in flight)."""
    for name in os.listdir(level_dir):
        if name.startswith((".tmp-step_", ".trash-step_")):
            shutil.rmtree(Path(level_dir) / name, ignore_errors=True)


def apply_retention(level_dir: str | Path, keep: int) -> list[int]:
    """Remove all but the newest `keep` committed checkpoints (never the pointer's); return removed steps."""
    pinned = read_pointer(level_dir)
    removed = []
    for step in committed_steps(level_dir)[keep:]:
        if step == pinned:
            continue
        shutil.rmtree(Path(level_dir) / step_dirname(step), ignore_errors=True)
        removed.append(step)
    return removed
