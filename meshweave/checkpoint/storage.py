"""DCP storage that never unpickles: JSON `.metadata` and raw tensor bytes in the `.distcp` files.

torch's `FileSystemReader` unpickles the `.metadata` file (`pickle.load`, so a crafted checkpoint
runs code on every rank that resumes from it) and reads each tensor with `torch.load` (the
restricted `weights_only` unpickler, still an unpickler). `SafeFileSystemWriter` / `SafeFileSystemReader`
replace both file formats and keep everything else of DCP (planning, resharding, collectives):

- `.metadata` is JSON (format "meshweave-dcp-metadata/1"). JSON rather than a restricted
  `pickle.Unpickler`: DCP's `Metadata` is a handful of dataclasses (TensorStorageMetadata with its
  TensorProperties and ChunkStorageMetadata, MetadataIndex -> _StorageInfo in storage_data, the
  planner's fqn -> object-path map in planner_data, StorageMeta) whose fields are strings, ints,
  torch.Size, a dtype, a layout and a memory format, so it round-trips exactly (`metadata_from_json`
  of `metadata_to_json(m)` == m) through a schema we check field by field. An allow-listing
  unpickler would still run the pickle VM over attacker bytes and must be re-audited whenever torch
  changes those classes; a JSON parser builds nothing but what the decoder constructs.
- a `.distcp` file holds each tensor chunk's raw bytes (C order, `byteorder` recorded in the
  metadata) at the offset/length the metadata records; dtype and shape come from the metadata. The
  reader checks offset, length and shape against the metadata and reads with `readinto`.
- non-tensor values ("bytes" items, which DCP would `torch.save` into the data files) are refused
  on write and unrepresentable on read: meshweave stores its non-tensor state as JSON itself.

A `.metadata` that is a pickle (DCP's default writer, an older meshweave, or a crafted file) is
refused with `MetadataFormatError`, as is any JSON that does not follow the schema exactly. So
checkpoints written before this format are not loaded (a resume falls back past them): there is no
way to tell a legitimate old pickle from a crafted one without unpickling it.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION, _StorageInfo
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties, TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from meshweave.checkpoint.codec import dtype_by_name

FORMAT = "meshweave-dcp-metadata/1"
METADATA_NAME = ".metadata"
DATA_FILE = re.compile(r"^__\d+_\d+\.distcp$")
_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
                   "preserve_format": torch.preserve_format}
_PICKLE_PROTO = 0x80


class MetadataFormatError(ValueError):
    """A `.metadata` file (or a Metadata to be written) that is not meshweave's safe format."""


# --- Metadata <-> JSON ------------------------------------------------------------------------
def metadata_to_json(md: Metadata) -> str:
    """`md` as JSON text; raises MetadataFormatError for what the format cannot hold (bytes items)."""
    tensors = []
    for fqn, item in md.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            raise MetadataFormatError(f"{fqn!r} is a non-tensor DCP item: meshweave stores only tensors with DCP "
                                      f"(non-tensor state goes to the JSON plain state)")
        p = item.properties
        layout = _name_of(_LAYOUTS, p.layout, f"{fqn}: layout")
        tensors.append({
            "fqn": fqn, "dtype": str(p.dtype).removeprefix("torch."), "layout": layout,
            "requires_grad": bool(p.requires_grad), "pin_memory": bool(p.pin_memory),
            "memory_format": _name_of(_MEMORY_FORMATS, p.memory_format, f"{fqn}: memory format"),
            "size": list(item.size),
            "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in item.chunks],
        })
    storage = []
    for index, info in (md.storage_data or {}).items():
        if getattr(info, "transform_descriptors", None):
            raise MetadataFormatError(f"{index.fqn}: stream transforms are not supported")
        storage.append({"fqn": index.fqn, "offset": None if index.offset is None else list(index.offset),
                        "index": index.index, "file": info.relative_path, "byte_offset": info.offset,
                        "length": info.length})
    sm = md.storage_meta
    doc = {
        "format": FORMAT, "byteorder": sys.byteorder, "version": md.version,
        "tensors": tensors, "storage_data": storage,
        "planner_data": _planner_data_to_json(md.planner_data),
        "storage_meta": None if sm is None else {
            "checkpoint_id": None if sm.checkpoint_id is None else os.fspath(sm.checkpoint_id),
            "save_id": sm.save_id, "load_id": sm.load_id, "modules": list(sm.modules)},
    }
    return json.dumps(doc, separators=(",", ":"))


def _name_of(table: dict[str, Any], value: Any, what: str) -> str:
    for name, known in table.items():
        if value == known:
            return name
    raise MetadataFormatError(f"{what} {value} is not supported")


def _planner_data_to_json(data: Any) -> dict[str, list] | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise MetadataFormatError(f"planner_data of type {type(data).__name__} is not supported")
    out = {}
    for fqn, path in data.items():
        if not isinstance(fqn, str) or not isinstance(path, (tuple, list)) or \
                not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in path):
            raise MetadataFormatError(f"planner_data entry {fqn!r}: {path!r} is not a path of names and indices")
        out[fqn] = list(path)
    return out


def metadata_from_json(text: str | bytes, where: str = METADATA_NAME) -> Metadata:
    """Parse and check JSON written by `metadata_to_json`; raise MetadataFormatError naming what is wrong."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise MetadataFormatError(f"{where}: not JSON ({err})") from None
    d = _Doc(where)
    d.obj(doc, "")
    if doc.get("format") != FORMAT:
        raise MetadataFormatError(f"{where}: not {FORMAT} metadata (format {doc.get('format')!r})")
    if doc.get("byteorder") != sys.byteorder:
        raise MetadataFormatError(f"{where}: tensors were written {doc.get('byteorder')}-endian, this machine is "
                                  f"{sys.byteorder}-endian")
    state: dict[str, TensorStorageMetadata] = {}
    for i, t in enumerate(d.field(doc, "tensors", list)):
        at = f"tensors[{i}]"
        d.obj(t, at)
        fqn = d.field(t, "fqn", str, at)
        if fqn in state:
            raise MetadataFormatError(f"{where}: {at}: tensor {fqn!r} listed twice")
        props = TensorProperties(
            dtype=_lookup(d, dtype_by_name, d.field(t, "dtype", str, at), f"{at}.dtype"),
            layout=_lookup(d, _LAYOUTS.get, d.field(t, "layout", str, at), f"{at}.layout"),
            requires_grad=d.field(t, "requires_grad", bool, at),
            memory_format=_lookup(d, _MEMORY_FORMATS.get, d.field(t, "memory_format", str, at), f"{at}.memory_format"),
            pin_memory=d.field(t, "pin_memory", bool, at))
        size = d.dims(d.field(t, "size", list, at), f"{at}.size")
        chunks = []
        for j, c in enumerate(d.field(t, "chunks", list, at)):
            cat = f"{at}.chunks[{j}]"
            d.obj(c, cat)
            offsets, sizes = d.dims(d.field(c, "offsets", list, cat), cat), d.dims(d.field(c, "sizes", list, cat), cat)
            if not len(offsets) == len(sizes) == len(size) or any(o + s > n for o, s, n in zip(offsets, sizes, size)):
                raise MetadataFormatError(f"{where}: {cat}: chunk {list(offsets)}+{list(sizes)} "
                                          f"outside tensor {list(size)}")
            chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
        state[fqn] = TensorStorageMetadata(properties=props, size=size, chunks=chunks)
    storage: dict[MetadataIndex, _StorageInfo] = {}
    for i, s in enumerate(d.field(doc, "storage_data", list)):
        at = f"storage_data[{i}]"
        d.obj(s, at)
        offset = d.field(s, "offset", (list, type(None)), at)
        index = MetadataIndex(d.field(s, "fqn", str, at), None if offset is None else d.dims(offset, f"{at}.offset"),
                              d.field(s, "index", (int, type(None)), at))
        file = d.field(s, "file", str, at)
        if not DATA_FILE.match(file):
            raise MetadataFormatError(f"{where}: {at}: data file name {file!r} is not one DCP writes")
        if index in storage:
            raise MetadataFormatError(f"{where}: {at}: {index.fqn} at {offset} stored twice")
        storage[index] = _StorageInfo(file, d.count(s, "byte_offset", at), d.count(s, "length", at))
    sm = d.field(doc, "storage_meta", (dict, type(None)))
    meta = None if sm is None else StorageMeta(
        checkpoint_id=d.field(sm, "checkpoint_id", (str, type(None)), "storage_meta"),
        save_id=d.field(sm, "save_id", (str, type(None)), "storage_meta"),
        load_id=d.field(sm, "load_id", (str, type(None)), "storage_meta"),
        modules=[d.typed(m, str, "storage_meta.modules") for m in d.field(sm, "modules", list, "storage_meta")])
    planner_data = _planner_data_from_json(d, d.field(doc, "planner_data", (dict, type(None))))
    md = Metadata(state_dict_metadata=state, planner_data=planner_data,
                  storage_data=storage, storage_meta=meta, version=d.field(doc, "version", (str, type(None))))
    problems = consistency_problems(md)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise MetadataFormatError(f"{where}: {problems[0]}{more}")
    return md


def _lookup(d: _Doc, get, name: str, at: str) -> Any:  # noqa: ANN001
    value = get(name)
    if value is None:
        raise MetadataFormatError(f"{d.where}: {at}: unknown value {name!r}")
    return value


def _planner_data_from_json(d: _Doc, data: Any) -> dict[str, tuple] | None:
    if data is None:
        return None
    d.obj(data, "planner_data")
    out = {}
    for fqn, path in data.items():
        items = d.typed(path, list, f"planner_data[{fqn!r}]")
        if not all(isinstance(p, (str, int)) and not isinstance(p, bool) for p in items):
            raise MetadataFormatError(f"{d.where}: planner_data[{fqn!r}]: not a path of names and indices")
        out[fqn] = tuple(items)
    return out


class _Doc:
    """Typed access to a parsed JSON document, raising MetadataFormatError with the field's path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def typed(self, value: Any, kind: type | tuple[type, ...], at: str) -> Any:
        kinds = kind if isinstance(kind, tuple) else (kind,)
        is_bool_as_int = isinstance(value, bool) and bool not in kinds  # JSON true is not an int here
        if is_bool_as_int or not isinstance(value, kinds):
            names = "/".join("null" if k is type(None) else k.__name__ for k in kinds)
            raise MetadataFormatError(f"{self.where}: {at or 'top level'}: expected {names}, "
                                      f"got {type(value).__name__}")
        return value

    def obj(self, value: Any, at: str) -> dict:
        return self.typed(value, dict, at)

    def field(self, doc: dict, key: str, kind: type | tuple[type, ...], at: str = "") -> Any:
        here = f"{at}.{key}" if at else key
        if key not in doc:
            raise MetadataFormatError(f"{self.where}: {here}: missing")
        return self.typed(doc[key], kind, here)

    def count(self, doc: dict, key: str, at: str) -> int:
        value = self.field(doc, key, int, at)
        if value < 0:
            raise MetadataFormatError(f"{self.where}: {at}.{key}: negative")
        return value

    def dims(self, values: list, at: str) -> torch.Size:
        self.typed(values, list, at)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise MetadataFormatError(f"{self.where}: {at}: {values!r} is not a list of non-negative ints")
        return torch.Size(values)


def consistency_problems(md: Metadata) -> list[str]:
    """Every tensor chunk stored exactly where its bytes fit, and nothing else stored."""
    problems = []
    storage = md.storage_data or {}
    expected = set()
    for fqn, item in md.state_dict_metadata.items():
        for chunk in item.chunks:
            index = MetadataIndex(fqn, chunk.offsets)
            expected.add(index)
            info = storage.get(index)
            if info is None:
                problems.append(f"tensor {fqn!r} chunk at {list(chunk.offsets)} has no stored bytes")
            elif info.length != chunk_nbytes(item.properties.dtype, chunk.sizes):
                problems.append(f"tensor {fqn!r} chunk at {list(chunk.offsets)}: {info.length} bytes stored, "
                                f"{chunk_nbytes(item.properties.dtype, chunk.sizes)} expected")
    problems += [f"stored bytes for {i.fqn!r} at {list(i.offset or [])} belong to no tensor chunk"
                 for i in storage if i not in expected]
    return problems


def chunk_nbytes(dtype: torch.dtype, sizes: torch.Size) -> int:
    return math.prod(sizes) * dtype.itemsize


def data_file_problems(md: Metadata, file_sizes: dict[str, int]) -> list[str]:
    """Stored byte ranges that fall outside their data file (`file_sizes`: the manifest's sizes)."""
    problems = []
    for index, info in (md.storage_data or {}).items():
        size = file_sizes.get(info.relative_path)
        if size is None:
            problems.append(f"{index.fqn!r} is stored in {info.relative_path}, which the manifest does not list")
        elif info.offset + info.length > size:
            problems.append(f"{index.fqn!r} is stored at bytes {info.offset}..{info.offset + info.length} of "
                            f"{info.relative_path}, which has {size}")
    return problems


def read_metadata_file(path: str | os.PathLike) -> Metadata:
    """The Metadata in a `.metadata` file of ours; MetadataFormatError (or OSError) otherwise. Never unpickles."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:1] == bytes([_PICKLE_PROTO]):
        raise MetadataFormatError(f"{path}: a pickle, not {FORMAT} JSON: refused, meshweave never unpickles "
                                  f"checkpoint files (unpickling can run arbitrary code)")
    return metadata_from_json(raw, str(path))


# --- storage writer / reader ----------------------------------------------------------------
class SafeFileSystemWriter(FileSystemWriter):
    """DCP FileSystemWriter writing raw tensor bytes (one file per rank) and JSON `.metadata`."""

    def __init__(self, path: str | os.PathLike, sync_files: bool = True) -> None:
        super().__init__(path, single_file_per_rank=True, sync_files=sync_files, thread_count=1)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=os.fspath(self.path), save_id=self.save_id)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        name = f"{plan.storage_data.prefix}0.distcp"
        results = []
        with open(Path(self.path) / name, "wb") as f:
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    raise MetadataFormatError(f"{item.index.fqn!r} is not a tensor: meshweave's DCP storage holds only "
                                              f"tensors (non-tensor state goes to the JSON plain state)")
                data = planner.resolve_data(item).detach().to("cpu").contiguous()
                if item.tensor_data is not None and data.shape != item.tensor_data.chunk.sizes:
                    raise RuntimeError(f"{item.index.fqn}: resolved shape {tuple(data.shape)} != planned "
                                       f"{tuple(item.tensor_data.chunk.sizes)}")
                raw = data.reshape(-1).view(torch.uint8).numpy()
                offset = f.tell()
                f.write(raw.data)
                results.append(WriteResult(index=item.index, size_in_bytes=raw.nbytes,
                                           storage_data=_StorageInfo(name, offset, raw.nbytes)))
            f.flush()
            if self.sync_files:
                os.fsync(f.fileno())
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.version = CURRENT_DCP_VERSION
        metadata.storage_data = {wr.index: wr.storage_data for wrs in results for wr in wrs}
        metadata.storage_meta = self.storage_meta()
        text = metadata_to_json(metadata)
        final = Path(self.path) / METADATA_NAME
        tmp = final.with_name(f"{METADATA_NAME}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            if self.sync_files:
                os.fsync(f.fileno())
        os.replace(tmp, final)


class SafeFileSystemReader(FileSystemReader):
    """DCP FileSystemReader for `SafeFileSystemWriter` checkpoints: JSON metadata, raw tensor bytes, no unpickling.

    `read_metadata` takes no `rank` keyword on purpose: DCP then never falls back to a rank-local
    `__<rank>.metadata` file (which we never write).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._chunks: dict[MetadataIndex, tuple[torch.dtype, torch.Size]] = {}

    def read_metadata(self) -> Metadata:  # type: ignore[override]
        metadata = read_metadata_file(Path(self.path) / METADATA_NAME)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        problems = consistency_problems(metadata)
        if problems:
            raise MetadataFormatError(f"{self.path}: {problems[0]}")
        self._chunks = {MetadataIndex(fqn, c.offsets): (item.properties.dtype, c.sizes)
                        for fqn, item in metadata.state_dict_metadata.items() for c in item.chunks}

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        per_file: dict[str, list] = {}
        for req in plan.items:
            if req.type == LoadItemType.BYTE_IO:
                raise MetadataFormatError(f"{req.storage_index.fqn!r}: non-tensor DCP items are not supported")
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append(req)
        for name, reqs in per_file.items():
            if not DATA_FILE.match(name):
                raise MetadataFormatError(f"{self.path}: data file name {name!r} is not one DCP writes")
            with open(Path(self.path) / name, "rb") as f:
                for req in sorted(reqs, key=lambda r: self.storage_data[r.storage_index].offset):
                    tensor = self._read_chunk(f, name, req.storage_index)
                    for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths)):
                        tensor = tensor.narrow(dim, start, length)
                    target = planner.resolve_tensor(req).detach()
                    if target.size() != tensor.size():
                        raise RuntimeError(f"{req.storage_index.fqn}: read {tuple(tensor.size())}, "
                                           f"destination is {tuple(target.size())}")
                    target.copy_(tensor)
                    planner.commit_tensor(req, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_chunk(self, f, name: str, index: MetadataIndex) -> torch.Tensor:  # noqa: ANN001
        dtype, sizes = self._chunks[index]
        info = self.storage_data[index]
        if info.length != chunk_nbytes(dtype, sizes):
            raise MetadataFormatError(f"{self.path}: {index.fqn}: {info.length} bytes for a "
                                      f"{list(sizes)} {dtype} chunk")
        buf = torch.empty(info.length, dtype=torch.uint8)
        f.seek(info.offset)
        got = f.readinto(buf.numpy()) if info.length else 0
        if got != info.length:
            raise MetadataFormatError(f"{Path(self.path) / name}: {index.fqn}: only {got} of {info.length} bytes "
                                      f"at offset {info.offset} (truncated)")
        return buf.view(dtype).reshape(sizes)
