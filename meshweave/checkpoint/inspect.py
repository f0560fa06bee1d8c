"""`meshweave ckpt list DIR` / `meshweave ckpt verify DIR`: what is in a checkpoint directory and is it intact.

DIR is a level directory (holding step_* directories and `latest`) or one checkpoint directory.
Nothing is unpickled: only manifests (JSON) are parsed and files are checksummed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from meshweave.checkpoint import layout


@dataclass
class CheckpointInfo:
    """One checkpoint directory as found on disk."""

    step: int
    path: str
    status: str  # "committed", "incomplete" (save killed mid-way) or "bad manifest"
    is_latest: bool = False
    world_size: int | None = None
    files: int = 0
    bytes: int = 0
    created_unix: float | None = None


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
    except layout.ManifestError:
        info.status = "bad manifest"
        return info
    info.world_size, info.created_unix = manifest.get("world_size"), manifest.get("created_unix")
    info.files = len(manifest["files"])
    info.bytes = sum(int(f["size"]) for f in manifest["files"].values())
    return info


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """Problems of one checkpoint directory (missing/truncated/corrupt files, bad manifest); [] if intact."""
    try:
        manifest = layout.read_manifest(path)
    except layout.ManifestError as err:
        return [str(err)]
    return layout.verify_files(path, manifest)


def _is_checkpoint_dir(path: Path) -> bool:
    return (path / layout.MANIFEST).exists() or path.name.startswith(("step_", ".tmp-step_"))


def _format_table(infos: list[CheckpointInfo]) -> str:
    rows = [("step", "status", "latest", "ranks", "files", "MiB", "created (UTC)", "path")]
    for i in infos:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(i.created_unix)) if i.created_unix else "-"
        rows.append((str(i.step), i.status, "*" if i.is_latest else "", str(i.world_size or "-"), str(i.files),
                     f"{i.bytes / 2**20:.2f}", created, i.path))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def _cmd_list(directory: Path) -> int:
    infos = list_checkpoints(directory)
    if not infos:
        print(f"no checkpoints in {directory}")
        return 0
    print(_format_table(infos))
    return 0


def _cmd_verify(directory: Path) -> int:
    if _is_checkpoint_dir(directory):
        targets = [directory]
    else:
        targets = [Path(i.path) for i in list_checkpoints(directory) if i.status != "incomplete"]
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
        sub.add_parser(name, help=help_text).add_argument("dir", help="checkpoint level directory or one checkpoint")
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
