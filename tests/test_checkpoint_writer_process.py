"""`checkpoint.writer: process`: the lazy checkpointer's disk writes in a writer process.

The same files as the thread writer (byte for byte), an exact resume (one process and two FSDP ranks),
failures reported like the thread writer's (a write error is an OSError, exit 3; a writer that died is
named), and no shared-memory segment or process left after close.
"""

from __future__ import annotations

import glob
import os
import signal
from pathlib import Path

import pytest
import torch.distributed as dist

from meshweave.checkpoint import Checkpointer, layout
from meshweave.checkpoint.settings import validate_checkpoint_settings
from meshweave.testing import run_distributed
from tests.checkpoint_support import TinyRun, assert_same_state, full_state, settings

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _train(directory: Path, writer: str, steps: int = 4) -> tuple[list[float], dict]:
    run = TinyRun(seed=0)
    ckpt = Checkpointer(settings(str(directory), every_steps=2, keep=2, writer=writer), None, 0, 1)
    losses = [run.step(ckpt) for _ in range(steps)]
    ckpt.close()
    return losses, full_state(run)


def _resume(directory: Path, writer: str, steps: int = 2) -> tuple[int, list[float], dict]:
    run = TinyRun(seed=9)
    ckpt = Checkpointer(settings(str(directory), every_steps=2, keep=2, writer=writer), None, 0, 1)
    step = ckpt.load_latest(run.app_state)
    loaded = full_state(run)
    losses = [run.step(ckpt) for _ in range(steps)]
    ckpt.close()
    return step, losses, loaded


def test_process_writer_writes_the_thread_writers_files_and_resumes_the_same(tmp_path):
    out = {w: _train(tmp_path / w, w) for w in ("thread", "process")}
    assert out["thread"][0] == out["process"][0]
    for step in (2, 4):
        a = layout.read_manifest(tmp_path / "thread" / layout.step_dirname(step))["files"]
        b = layout.read_manifest(tmp_path / "process" / layout.step_dirname(step))["files"]
        data = [n for n in a if n.endswith(".distcp")]
        assert data and {n: a[n] for n in data} == {n: b[n] for n in data}  # same size and CRC32
        for n in data:
            assert (tmp_path / "thread" / layout.step_dirname(step) / n).read_bytes() == \
                   (tmp_path / "process" / layout.step_dirname(step) / n).read_bytes()
    resumed = {w: _resume(tmp_path / w, w) for w in ("thread", "process")}
    assert resumed["thread"][0] == resumed["process"][0] == 4
    assert resumed["thread"][1] == resumed["process"][1]
    assert_same_state(resumed["process"][2], out["thread"][1])


def test_no_segment_and_no_writer_left_after_close(tmp_path):
    run = TinyRun(seed=0)
    ckpt = Checkpointer(settings(str(tmp_path), writer="process"), None, 0, 1)
    run.step(ckpt)
    ckpt.wait()
    pid = ckpt.disk.pid
    assert pid is not None and glob.glob(f"/dev/shm/meshweave-ckpt-{os.getpid()}-*")
    ckpt.close()
    assert not glob.glob(f"/dev/shm/meshweave-ckpt-{os.getpid()}-*")
    assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"


def test_write_error_in_the_writer_process_is_a_filesystem_error(tmp_path):
    from meshweave.launch.errors import exit_status_for

    run = TinyRun(seed=0)
    ckpt = Checkpointer(settings(str(tmp_path / "ck"), writer="process"), None, 0, 1)
    run.step(ckpt)
    ckpt.wait()
    (tmp_path / "ck").rename(tmp_path / "moved")
    (tmp_path / "ck").write_text("a file where the checkpoints were\n")
    run.step(ckpt)
    with pytest.raises(Exception) as caught:
        ckpt.wait()
    ckpt.close()
    assert exit_status_for(caught.value) == 3, caught.value
    assert "Not a directory" in str(caught.value) or "File exists" in str(caught.value)


def test_writer_process_that_died_is_named(tmp_path):
    run = TinyRun(seed=0)
    ckpt = Checkpointer(settings(str(tmp_path), writer="process"), None, 0, 1)
    run.step(ckpt)
    ckpt.wait()
    os.kill(ckpt.disk.pid, signal.SIGKILL)
    run.step(ckpt)
    with pytest.raises(Exception, match="checkpoint writer process"):
        ckpt.wait()
    ckpt.close()
    assert layout.committed_steps(tmp_path) == [1]


def test_process_writer_needs_lazy_mode():
    assert validate_checkpoint_settings(settings("/tmp/x", writer="process", mode="sync")) == [
        "checkpoint.writer: 'process' needs checkpoint.mode: lazy (sync mode writes in the training process)"]


def _fsdp_resume(directory: str, writer: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    def setup(seed: int) -> TinyRun:
        return TinyRun(mesh=init_device_mesh("cpu", (dist.get_world_size(),)), seed=seed)

    group = dist.new_group(backend="gloo")
    cfg = settings(directory, every_steps=2, writer=writer)
    first = setup(0)
    ckpt = Checkpointer(cfg, group, dist.get_rank(), dist.get_world_size())
    head = [first.step(ckpt) for _ in range(4)]
    at_4 = full_state(first)
    first.step(ckpt)
    ckpt.close()
    resumed = setup(42)
    ckpt = Checkpointer(cfg, group, dist.get_rank(), dist.get_world_size())
    step = ckpt.load_latest(resumed.app_state)
    loaded = full_state(resumed)
    tail = [resumed.step(ckpt) for _ in range(2)]
    ckpt.close()
    dist.destroy_process_group(group)
    try:
        assert_same_state(loaded, at_4)
        same = True
    except AssertionError:
        same = False
    return {"step": step, "losses": head + tail, "state_ok": same}


def test_two_fsdp_ranks_resume_exactly_like_the_thread_writer(tmp_path):
    results = {w: run_distributed(_fsdp_resume, 2, str(tmp_path / w), w, timeout=300) for w in ("thread", "process")}
    for w, per_rank in results.items():
        for res in per_rank:
            assert res["step"] == 4 and res["state_ok"], (w, res)
    assert [r["losses"] for r in results["process"]] == [r["losses"] for r in results["thread"]]
