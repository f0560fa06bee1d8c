"""What a checkpoint's files must hold, checked before anything is loaded from them.

A manifest's checksums prove that files are as written, not that a meshweave save wrote them: a
hand-edited or crafted checkpoint can carry matching checksums. So each file whose checksum matches
is also parsed, by the same code the loader uses, and its structure checked:

- `.metadata`: meshweave's JSON DCP metadata (`storage.read_metadata_file`: a pickle is refused,
  never unpickled), whose byte ranges lie inside the data files the manifest lists;
- `plain/replicated.json`: {"entries": {...}, "sharded_plain": {...}} and
  `plain/rank_NNNNN.json`: {"rank": N, "entries": {...}}, every value decodable by `codec.decode`.

A checkpoint with any such problem is treated like a corrupt one: `ckpt verify` reports it and the
loader falls back to an older checkpoint.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from meshweave.checkpoint import codec, layout, storage

_RANK_PLAIN = re.compile(r"^plain/rank_(\d{5})\.json$")


class PlainStateFormatError(ValueError):
    """A plain-state JSON file that is not what a meshweave save writes."""


def verify(ckpt_dir: str | Path, manifest: dict[str, Any], names: list[str] | None = None,
           checksums: bool = True) -> list[str]:
    """Problems of the listed files (default: all, plus completeness): sizes, checksums (unless
    `checksums` is False: `checkpoint.verify: false`), then contents."""
    files = manifest["files"]
    problems = layout.structure_problems(ckpt_dir, manifest) if names is None else []
    for name in files if names is None else names:
        problems += layout.verify_one(ckpt_dir, name, files[name], checksums) or content_problems(ckpt_dir, name, manifest)
    return problems


def content_problems(ckpt_dir: str | Path, name: str, manifest: dict[str, Any]) -> list[str]:
    """Problems with what one (checksum-verified) file of a checkpoint holds; [] for files not checked."""
    path = Path(ckpt_dir) / name
    try:
        if name == layout.DCP_METADATA:
            md = storage.read_metadata_file(path)
            sizes = {n: meta["size"] for n, meta in manifest["files"].items()}
            problems = storage.data_file_problems(md, sizes)
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            return [f"{path}: {problems[0]}{more}"] if problems else []
        if name == layout.REPLICATED_PLAIN or _RANK_PLAIN.match(name):
            read_plain(path, name)
    except (storage.MetadataFormatError, PlainStateFormatError) as err:
        return [str(err)]
    except OSError as err:
        return [f"{path}: unreadable ({err})"]
    return []


def read_plain(path: str | Path, name: str | None = None) -> dict[str, Any]:
    """A plain-state file (replicated or per-rank, from its name) parsed and checked; PlainStateFormatError if wrong.

    The values stay encoded (`codec.decode` them); checking has decoded each of them once.
    """
    path = Path(path)
    name = name or f"plain/{path.name}"
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:
        raise PlainStateFormatError(f"{path}: not JSON ({err})") from None
    if not isinstance(doc, dict):
        raise PlainStateFormatError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    sections = ("entries", "sharded_plain") if name == layout.REPLICATED_PLAIN else ("entries",)
    for key in sections:
        _decodable_section(path, doc, key)
    if name != layout.REPLICATED_PLAIN:
        rank = doc.get("rank")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
            raise PlainStateFormatError(f"{path}: 'rank' is {rank!r}, expected a non-negative int")
    return doc


def _decodable_section(path: Path, doc: dict[str, Any], key: str) -> None:
    section = doc.get(key)
    if not isinstance(section, dict):
        raise PlainStateFormatError(f"{path}: {key!r} is {type(section).__name__ if key in doc else 'missing'}, "
                                    f"expected an object of saved state")
    for entry, value in section.items():
        try:
            codec.decode(value)
        except codec.PlainStateError as err:
            raise PlainStateFormatError(f"{path}: {key}[{entry!r}] cannot be decoded: {err}") from None
