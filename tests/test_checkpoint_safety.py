"""A checkpoint cannot run code, and a malformed one is skipped, not crashed on (issue 9, item 4).

Crafted files are planted in real checkpoints with their manifest sizes and CRC32s updated to match,
as an attacker with write access to the checkpoint directory would: checksums prove nothing about
who wrote a file. A tiny model keeps every test to a fraction of a second (resharding of the new
format is covered by the 4 -> 2 test in test_checkpoint_dist.py).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from meshweave.checkpoint import (
    CheckpointFallbackWarning, Checkpointer, CheckpointSettings, ModelState, OptimizerState, layout,
)
from meshweave.checkpoint import codec, contents, storage
from meshweave.checkpoint.inspect import ckpt_main, list_checkpoints

REPO = Path(__file__).resolve().parents[1]

# DCP warns on every single-process call that it runs single-process: that is intended here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


class _Exploit:
    """Unpickling this writes `sentinel`: the stand-in for any code a crafted pickle could run."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (exec, (f"open({self.sentinel!r}, 'w').write('pwned')",))


class _Counter:
    """A trainer entry: step count and the global RNG (per-rank JSON state)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "rng": torch.get_rng_state()}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step = sd["step"]
        torch.set_rng_state(sd["rng"])


class _Run:
    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.counter = _Counter()
        self.app_state = {"model": ModelState([self.model]), "optimizer": OptimizerState([self.model], [self.opt]),
                          "trainer": self.counter}

    def step(self, ckpt: Checkpointer | None = None) -> None:
        self.model(torch.randn(3, 4)).square().mean().backward()
        if ckpt is not None:
            ckpt.before_optimizer_step()
        self.opt.step()
        self.opt.zero_grad()
        self.counter.step += 1
        if ckpt is not None:
            ckpt.after_optimizer_step(self.counter.step, self.app_state)

    def tensors(self) -> dict[str, torch.Tensor]:
        flat = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        for i, (p, st) in enumerate(self.opt.state.items()):
            flat.update({f"opt.{i}.{k}": v for k, v in st.items()})
        return {k: v.detach().clone() for k, v in flat.items()}


def _settings(d: Path) -> CheckpointSettings:
    return CheckpointSettings(dir=str(d), every_steps=1, mode="sync", keep=3)


@pytest.fixture
def saved(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Checkpoints of steps 1 and 2 under tmp_path/ckpt; returns (dir, the tensors at step 1)."""
    d = tmp_path / "ckpt"
    run, ckpt = _Run(), Checkpointer(_settings(d), None, 0, 1, replicated_keys=())
    run.step(ckpt)
    at_1 = run.tensors()
    run.step(ckpt)
    ckpt.close()
    return d, at_1


def _plant(ckpt_dir: Path, name: str, data: bytes) -> None:
    """Replace one file of a committed checkpoint and update its manifest entry to match."""
    (ckpt_dir / name).write_bytes(data)
    manifest = json.loads((ckpt_dir / layout.MANIFEST).read_text())
    size, crc = layout.file_checksum(ckpt_dir / name)
    manifest["files"][name].update(size=size, crc32=crc)
    (ckpt_dir / layout.MANIFEST).write_text(json.dumps(manifest))


def _load_latest(d: Path) -> tuple[int | None, _Run]:
    run = _Run(seed=99)
    step = Checkpointer(_settings(d), None, 0, 1, replicated_keys=()).load_latest(run.app_state)
    return step, run


def _assert_tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --- (a) a crafted pickle is never unpickled ------------------------------------------------


@pytest.mark.parametrize("protocol", [0, pickle.HIGHEST_PROTOCOL])
def test_crafted_pickle_metadata_runs_nothing_and_falls_back(saved, tmp_path, protocol, capsys):
    d, at_1 = saved
    sentinel = tmp_path / "SENTINEL"
    step_2 = d / layout.step_dirname(2)
    _plant(step_2, layout.DCP_METADATA, pickle.dumps(_Exploit(sentinel), protocol=protocol))
    with pytest.raises(Exception):  # the control: torch's stock reader does run it
        FileSystemReader(step_2).read_metadata()
    assert sentinel.exists(), "the crafted pickle is not live: this test would prove nothing"
    sentinel.unlink()
    assert layout.verify_files(step_2, layout.read_manifest(step_2)) == []  # checksums alone: all fine

    assert ckpt_main(["verify", str(d)]) == 1
    out = capsys.readouterr().out
    assert f"CORRUPT {step_2}" in out and "1 intact, 1 corrupt" in out
    [reason] = [line for line in out.splitlines() if line.startswith("    ")]
    assert ".metadata" in reason and ("a pickle" in reason if protocol else "not JSON" in reason)

    assert ckpt_main(["list", str(d)]) == 0
    assert [(i.step, i.status) for i in list_checkpoints(d)] == [(2, "bad metadata"), (1, "committed")]
    assert "bad metadata" in capsys.readouterr().out

    with pytest.warns(CheckpointFallbackWarning, match=r"step 2 .*\.metadata"):
        step, run = _load_latest(d)
    assert step == 1 and run.counter.step == 1
    _assert_tensors_equal(run.tensors(), at_1)
    assert not sentinel.exists()


@pytest.mark.slow  # a fresh interpreter (the in-process checks above stay in the fast subset)
def test_meshweave_ckpt_verify_reports_crafted_checkpoint_in_a_fresh_process(saved, tmp_path):
    d, _ = saved
    sentinel = tmp_path / "SENTINEL"
    _plant(d / layout.step_dirname(2), layout.DCP_METADATA, pickle.dumps(_Exploit(sentinel)))
    proc = subprocess.run([sys.executable, "-m", "meshweave", "ckpt", "verify", str(d)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "a pickle" in proc.stdout and "1 intact, 1 corrupt" in proc.stdout and "Traceback" not in proc.stderr
    assert not sentinel.exists()


def test_reader_refuses_pickles_even_unverified_and_ignores_rank_local_metadata(saved, tmp_path):
    """Called without the manifest check, the reader still never unpickles: not `.metadata`, nor the
    rank-local `__0.metadata` DCP's loader falls back to when `.metadata` fails."""
    d, _ = saved
    sentinel = tmp_path / "SENTINEL"
    step_2 = d / layout.step_dirname(2)
    for name in (layout.DCP_METADATA, "__0.metadata"):
        (step_2 / name).write_bytes(pickle.dumps(_Exploit(sentinel)))
    with pytest.raises(storage.MetadataFormatError, match="a pickle"):
        storage.SafeFileSystemReader(step_2).read_metadata()
    target = {k: torch.zeros_like(v) for k, v in _Run().app_state["model"].state_dict().items()}
    with pytest.raises(BaseException):  # noqa: B017 - DCP wraps the refusal; that it fails is the point
        dcp.load(target, storage_reader=storage.SafeFileSystemReader(step_2), no_dist=True)
    assert not sentinel.exists()


def test_data_files_are_raw_bytes_a_pickle_there_is_just_numbers(saved, tmp_path):
    d, _ = saved
    sentinel = tmp_path / "SENTINEL"
    step_2 = d / layout.step_dirname(2)
    shard = step_2 / "__0_0.distcp"
    size = shard.stat().st_size
    payload = pickle.dumps(_Exploit(sentinel))
    _plant(step_2, shard.name, (payload * (size // len(payload) + 1))[:size])  # same size, valid metadata
    step, _ = _load_latest(d)
    assert step == 2  # intact as far as any check can tell: the bytes load as (garbage) numbers
    assert not sentinel.exists()


# --- (b) right checksum, wrong structure ------------------------------------------------------

_RANK0 = layout.per_rank_plain_name(0)
_BAD_TENSOR = {"__mw__": "tensor", "dtype": "float32", "shape": [3], "data": "AAAA"}  # 3 bytes, 12 needed
STRUCTURE_DAMAGE = {
    "replicated state is a list": (layout.REPLICATED_PLAIN, lambda doc: [], "expected a JSON object"),
    "entries is a list": (_RANK0, lambda doc: {**doc, "entries": [1, 2]}, "'entries' is list"),
    "no sharded_plain": (layout.REPLICATED_PLAIN, lambda doc: {"entries": {}}, "'sharded_plain' is missing"),
    "rank is a string": (_RANK0, lambda doc: {**doc, "rank": "0"}, "'rank' is '0'"),
    "tensor bytes do not fit its shape": (
        _RANK0, lambda doc: {**doc, "entries": {"trainer": {"step": 1, "rng": _BAD_TENSOR}}}, "3 bytes of data"),
    "unknown tag": (_RANK0, lambda doc: {**doc, "entries": {"trainer": {"__mw__": "pickle"}}}, "unknown tag"),
    "tuple without items": (layout.REPLICATED_PLAIN,
                            lambda doc: {**doc, "sharded_plain": {"x": {"__mw__": "tuple", "v": 3}}}, "expected list"),
    "metadata not our schema": (layout.DCP_METADATA, lambda doc: {**doc, "tensors": {}}, "tensors: expected list"),
    "metadata reads past the data file": (
        layout.DCP_METADATA,
        lambda doc: {**doc, "storage_data": [{**s, "byte_offset": s["byte_offset"] + 10**6}
                                             for s in doc["storage_data"]]},
        "which has"),
    "metadata names a file outside the checkpoint": (
        layout.DCP_METADATA,
        lambda doc: {**doc, "storage_data": [{**s, "file": "../../etc/passwd"} for s in doc["storage_data"]]},
        "not one DCP writes"),
}


@pytest.mark.parametrize("kind", sorted(STRUCTURE_DAMAGE))
def test_wrong_structure_with_right_checksum_is_reported_and_skipped(saved, kind, capsys):
    d, at_1 = saved
    name, damage, reason = STRUCTURE_DAMAGE[kind]
    step_2 = d / layout.step_dirname(2)
    _plant(step_2, name, json.dumps(damage(json.loads((step_2 / name).read_bytes()))).encode())
    assert layout.verify_files(step_2, layout.read_manifest(step_2)) == []  # checksums match

    assert ckpt_main(["verify", str(step_2)]) == 1
    out = capsys.readouterr().out
    [line] = [ln for ln in out.splitlines() if ln.startswith("    ")]
    assert name in line and reason in line, line

    with pytest.warns(CheckpointFallbackWarning, match=f"step 2 .*{reason}"):
        step, run = _load_latest(d)  # no TypeError, no traceback: the previous checkpoint
    assert step == 1 and run.counter.step == 1
    _assert_tensors_equal(run.tensors(), at_1)


def test_manifest_that_points_outside_the_checkpoint_is_refused(saved):
    d, _ = saved
    step_2 = d / layout.step_dirname(2)
    manifest = json.loads((step_2 / layout.MANIFEST).read_text())
    manifest["files"]["../../outside"] = {"size": 0, "crc32": "00000000", "rank": 0}
    (step_2 / layout.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(layout.ManifestError, match="not a relative path inside"):
        layout.read_manifest(step_2)
    with pytest.warns(CheckpointFallbackWarning, match="step 2"):
        assert _load_latest(d)[0] == 1
    assert [(i.step, i.status) for i in list_checkpoints(d)] == [(2, "bad manifest"), (1, "committed")]


def test_plain_state_decoder_refuses_what_encode_never_writes():
    for bad in ({"__mw__": "ndarray", "dtype": "O", "shape": [1], "data": ""},  # object arrays: no
                {"__mw__": "tensor", "dtype": "Tensor", "shape": [], "data": ""},  # no attribute lookup on torch
                {"__mw__": "dict", "items": [[[{"a": 1}], 2]]},  # unhashable key
                {"__mw__": "float", "v": "1e309x"},
                {"__mw__": "tensor", "dtype": "float32", "shape": [-1], "data": ""}):
        with pytest.raises(codec.PlainStateError):
            codec.decode(bad)
    value = {"t": (1, 2.5, float("-inf")), 3: [None, True], "x": torch.arange(6, dtype=torch.int16).reshape(2, 3)}
    back = codec.loads(codec.dumps(value))
    assert back["t"] == value["t"] and back[3] == value[3] and torch.equal(back["x"], value["x"])


# --- (c) the new format round-trips exactly ---------------------------------------------------


def test_metadata_json_round_trips_exactly_and_tensors_load_bitwise(tmp_path):
    torch.manual_seed(0)
    state = {
        "f32": torch.randn(5, 3), "bf16": torch.randn(4, dtype=torch.bfloat16),
        "f64": torch.randn(2, 2, dtype=torch.float64),
        "i64": torch.arange(7), "bool": torch.rand(6) > 0.5, "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
        "c64": torch.randn(3, dtype=torch.complex64), "strided": torch.randn(4, 6)[:, ::2],
    }
    written = dcp.save(state, storage_writer=storage.SafeFileSystemWriter(tmp_path), no_dist=True)
    text = (tmp_path / layout.DCP_METADATA).read_text()
    assert json.loads(text)["format"] == storage.FORMAT
    back = storage.read_metadata_file(tmp_path / layout.DCP_METADATA)
    assert back == written  # every dataclass, the MetadataIndex-keyed storage_data, planner_data, storage_meta
    assert storage.metadata_to_json(back) == text
    assert all(isinstance(v.size, torch.Size) for v in back.state_dict_metadata.values())
    assert back.state_dict_metadata["bf16"].properties.dtype == torch.bfloat16

    target = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(target, storage_reader=storage.SafeFileSystemReader(tmp_path), no_dist=True)
    for k in state:
        assert target[k].dtype == state[k].dtype and torch.equal(target[k], state[k]), k
    data = (tmp_path / "__0_0.distcp").read_bytes()
    assert not data.startswith(b"PK") and b"pickle" not in data  # raw bytes, not torch.save archives


def test_non_tensor_values_never_reach_the_dcp_files(tmp_path):
    with pytest.raises(CheckpointException, match="not a tensor"):  # DCP wraps our MetadataFormatError
        dcp.save({"w": torch.ones(2), "n": 3}, storage_writer=storage.SafeFileSystemWriter(tmp_path), no_dist=True)


def test_checkpointer_round_trip_through_the_new_format(saved):
    d, _ = saved
    run = _Run()
    ckpt = Checkpointer(_settings(d / "again"), None, 0, 1, replicated_keys=())
    run.step(ckpt)
    ckpt.close()
    expected = run.tensors()
    step, loaded = _load_latest(d / "again")
    assert step == 1 and loaded.counter.step == 1
    _assert_tensors_equal(loaded.tensors(), expected)
    step_dir = d / "again" / layout.step_dirname(1)
    assert contents.verify(step_dir, layout.read_manifest(step_dir)) == []
    assert ckpt_main(["verify", str(d / "again")]) == 0
