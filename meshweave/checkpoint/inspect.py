"""`meshweave ckpt list DIR` / `meshweave ckpt verify DIR`: what is in a checkpoint directory and is it intact.

DIR is a level directory (holding step_* directories and `latest`) or one checkpoint directory.
Nothing is unpickled: `list` parses manifests and DCP metadata (JSON, through `storage`: a pickled
`.metadata` is reported as "bad metadata", never loaded); `verify` also checksums every file and
checks the contents of each intact one (`contents.verify`), as the loader does before it loads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from meshweave.checkpoint import contents, layout, storage


@dataclass
class CheckpointInfo:
    """One checkpoint directory as found on disk."""

    step: int
    path: str
    status: str  # "committed", "incomplete" (save killed mid-way), "bad manifest" or "bad metadata"
    is_latest: bool = False
    world_size: int | None = None
    files: int = 0
    bytes: int = 0
    created_unix: float | None = None
    tensors: int | None = None  # tensors in the DCP metadata
    problem: str | None = None  # why the status is "bad ..."


def list_checkpoints(directory: str | os.PathLike) -> list[CheckpointInfo]:
    """Committed and incomplete checkpoints in a level directory, newest first (no checksumming)."""
    directory = Path(directory)
    latest = layout.read_pointer(directory)
    infos = [_committed_info(directory, step, latest) for step in layout.committed_steps(directory)]
    for name in sorted(os.listdir(directory)) if directory.is_dir() else []:
        if name.startswith(".tmp-step_"):
            step = int(name.removeprefix(".tmp-step_"))
            infos.append(CheckpointInfo(step, str(directory / name), "incomplete"))
    return sorted(infos, key=lambda i: (-i.step, i.status != "committed"))


def _committed_info(directory: Path, step: int, latest: int | None) -> CheckpointInfo:
    path = directory / layout.step_dirname(step)
    info = CheckpointInfo(step, str(path), "committed", is_latest=step == latest)
    try:
        manifest = layout.read_manifest(path)
    except layout.ManifestError as err:
        info.status, info.problem = "bad manifest", str(err)
        return info
    info.world_size, info.created_unix = manifest.get("world_size"), manifest.get("created_unix")
    info.files = len(manifest["files"])
    info.bytes = sum(int(f["size"]) for f in manifest["files"].values())
    try:
        info.tensors = len(storage.read_metadata_file(path / layout.DCP_METADATA).state_dict_metadata)
    except (OSError, storage.MetadataFormatError) as err:
        info.status, info.problem = "bad metadata", str(err)
    return info


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """Problems of one checkpoint directory (bad manifest; missing, truncated or corrupt files; contents
    that are not what a meshweave save writes); [] if intact."""
    try:
        manifest = layout.read_manifest(path)
    except layout.ManifestError as err:
        return [str(err)]
    return contents.verify(path, manifest)


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / layout.MANIFEST).exists() or path.name.startswith(("step_", ".tmp-step_"))


def _format_table(infos: list[CheckpointInfo]) -> str:
    rows = [("step", "status", "latest", "ranks", "files", "tensors", "MiB", "created (UTC)", "path")]
    for i in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(i.created_unix)) if i.created_unix else "-"
        rows.append((str(i.step), i.status, "*" if i.is_latest else "", str(i.world_size or "-"), str(i.files),
                     "-" if i.tensors is None else str(i.tensors), f"{i.bytes / 2**20:.2f}", created, i.path))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    table = "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)
    notes = [f"step {i.step}: {i.problem}" for i in infos if i.problem]
    return "\n".join([table, *notes])


def _level_dirs(directory: Path) -> list[Path]:
    """The level directories under `directory`: itself, or each rank's own copies in a node-local level."""
    ranks = sorted(p for p in directory.glob("rank_[0-9][0-9][0-9][0-9][0-9]") if p.is_dir())
    return ranks if ranks and not layout.committed_steps(directory) else [directory]


def _cmd_list(directory: Path) -> int:
    infos = [info for level in _level_dirs(directory) for info in list_checkpoints(level)]
    if not infos:
        print(f"no checkpoints in {directory}")
        return 0
    print(_format_table(infos))
    return 0


def _cmd_verify(directory: Path) -> int:
    if _is_checkpoint_dir(directory):
        targets = [directory]
    else:
        targets = [Path(i.path) for level in _level_dirs(directory) for i in list_checkpoints(level)
                   if i.status != "incomplete"]
    if not targets:
        print(f"no committed checkpoints in {directory}")
        return 1
    bad = 0
    for target in targets:
        problems = verify_checkpoint(target)
        bad += bool(problems)
        print(f"{'OK     ' if not problems else 'CORRUPT'} {target}")
        for p in problems:
            print(f"    {p}")
    print(f"{len(targets) - bad} intact, {bad} corrupt")
    return 1 if bad else 0


def ckpt_main(argv: list[str]) -> int:
    """`ckpt list DIR` prints a table; `ckpt verify DIR` checksums every file. Exit: 0 ok, 1 corrupt, 2 usage."""
    parser = argparse.ArgumentParser(prog="meshweave ckpt", description="inspect meshweave checkpoints")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("list", "list checkpoints in a directory"), ("verify", "verify sizes and checksums")):
        sub.add_parser(name, help=help_text).add_argument("dir", help="checkpoint level directory (a node-local one: every rank's copies) or one checkpoint")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    directory = Path(args.dir)
    if not directory.is_dir():
        print(f"meshweave ckpt {args.command}: {directory} is not a directory", file=sys.stderr)
        return 2
    return _cmd_list(directory) if args.command == "list" else _cmd_verify(directory)


if __name__ == "__main__":
    sys.exit(ckpt_main(sys.argv[1:]))
