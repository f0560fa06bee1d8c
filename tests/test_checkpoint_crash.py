"""A save killed at any point, and corrupted files: the restart loads the newest complete checkpoint.

The saving run is a subprocess that SIGKILLs itself at a named point of step 3's save (checkpoints
every step, levels local -> persistent); the load happens here, in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshweave.checkpoint import CheckpointFallbackWarning, Checkpointer, layout
from meshweave.checkpoint.crash import ENV_POINT
from tests.checkpoint_support import (  # noqa: F401 - one_intra_op_thread is an autouse fixture
    TinyRun, assert_same_state, full_state, one_intra_op_thread, settings,
)

REPO = Path(__file__).resolve().parents[1]
STEPS = 5

# point of step 3's save -> newest step complete on some level afterwards
CRASH_POINTS = {
    "copy": 2,
    "write:local": 2,
    "before_manifest:local": 2,
    "after_manifest:local": 2,
    "before_pointer:local": 3,  # committed locally: complete, though `latest` still says 2
    "write:persistent": 3,
    "after_manifest:persistent": 3,
    "before_pointer:persistent": 3,
}

# DCP warns on every single-process call that it runs single-process: that is intended here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _reference() -> tuple[list[float], dict[int, dict]]:
    run, losses, states = TinyRun(), [], {}
    for step in range(1, STEPS + 1):
        losses.append(run.step())
        states[step] = full_state(run)
    return losses, states


@pytest.fixture(scope="module")
def reference():
    return _reference()


def _saver_cmd(local: Path, shared: Path, crash_at: str | None) -> tuple[list[str], dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop(ENV_POINT, None)
    if crash_at:
        env[ENV_POINT] = crash_at
    cmd = [sys.executable, "-m", "tests.checkpoint_support", str(local), str(STEPS),
           "--levels", "local,persistent", "--persistent-dir", str(shared), "--keep", "2"]
    return cmd, env


def _run_saver(local: Path, shared: Path, crash_at: str | None) -> subprocess.CompletedProcess:
    cmd, env = _saver_cmd(local, shared, crash_at)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def crashed_runs(tmp_path_factory) -> dict[str, tuple[Path, Path, int, str]]:
    """Every crash point's saver, started together (start-up dominates), killed at step 3's save."""
    procs = {}
    for point in CRASH_POINTS:
        root = tmp_path_factory.mktemp(point.replace(":", "_"))
        cmd, env = _saver_cmd(root / "local", root / "shared", f"{point}@3")
        procs[point] = (root, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = {}
    for point, (root, proc) in procs.items():
        _, err = proc.communicate(timeout=300)
        out[point] = (root / "local", root / "shared", proc.returncode, err)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_kill_during_save_resumes_from_newest_complete(crashed_runs, reference, point):
    ref_losses, ref_states = reference
    local, shared, returncode, stderr = crashed_runs[point]
    assert returncode == -9, f"saver was not killed at {point}: rc={returncode}\n{stderr[-3000:]}"
    for level_dir in (local, shared):  # `latest` never names an uncommitted step
        pointer = layout.read_pointer(level_dir)
        assert pointer is None or pointer in layout.committed_steps(level_dir)
    expected = CRASH_POINTS[point]
    cfg = settings(str(local), levels=["local", "persistent"], persistent_dir=str(shared), keep=2)
    run = TinyRun(seed=99)
    ckpt = Checkpointer(cfg, None, 0, 1)
    assert ckpt.load_latest(run.app_state) == expected
    assert_same_state(full_state(run), ref_states[expected])
    losses = [run.step(ckpt) for _ in range(expected, STEPS)]  # and saving works again over the debris
    ckpt.close()
    assert losses == ref_losses[expected:]
    assert layout.committed_steps(local)[0] == STEPS
    assert not [n for n in os.listdir(local) if n.startswith(".tmp")]


@pytest.mark.slow
def test_restarted_subprocess_finishes_with_uninterrupted_losses(tmp_path, reference):
    local, shared = tmp_path / "local", tmp_path / "shared"
    assert _run_saver(local, shared, "before_manifest:local@4").returncode == -9
    proc = _run_saver(local, shared, None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["start"] == 3 and out["losses"] == reference[0][3:]


# --- corruption ---------------------------------------------------------------------------


def _saved_dir(tmp_path: Path, steps: int = 3) -> Path:
    run = TinyRun()
    ckpt = Checkpointer(settings(str(tmp_path), keep=3), None, 0, 1)
    for _ in range(steps):
        run.step(ckpt)
    ckpt.close()
    return tmp_path


def _shard(d: Path, step: int) -> Path:
    return d / layout.step_dirname(step) / "__0_0.distcp"


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 7)


def _flip_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))


def _delete_metadata(d: Path, step: int) -> None:
    (d / layout.step_dirname(step) / layout.DCP_METADATA).unlink()


def _garble_manifest(d: Path, step: int) -> None:
    (d / layout.step_dirname(step) / layout.MANIFEST).write_text("{not json")


def _flip_plain(d: Path, step: int) -> None:
    _flip_byte(d / layout.step_dirname(step) / layout.per_rank_plain_name(0))


CORRUPTIONS = {
    "truncated shard": lambda d, s: _truncate(_shard(d, s)),
    "flipped byte in shard": lambda d, s: _flip_byte(_shard(d, s)),
    "missing .metadata": _delete_metadata,
    "unreadable manifest": _garble_manifest,
    "flipped byte in plain state": _flip_plain,
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruption_detected_and_previous_checkpoint_used(tmp_path, reference, kind):
    d = _saved_dir(tmp_path)
    CORRUPTIONS[kind](d, 3)
    run = TinyRun(seed=5)
    with pytest.warns(CheckpointFallbackWarning, match="step 3"):
        step = Checkpointer(settings(str(d)), None, 0, 1).load_latest(run.app_state)
    assert step == 2
    assert_same_state(full_state(run), reference[1][2])


def test_every_checkpoint_corrupt_starts_from_scratch(tmp_path):
    d = _saved_dir(tmp_path, steps=2)
    for step in (1, 2):
        _flip_byte(_shard(d, step))
    run = TinyRun(seed=5)
    before = full_state(run)
    with pytest.warns(CheckpointFallbackWarning):
        assert Checkpointer(settings(str(d)), None, 0, 1).load_latest(run.app_state) is None
    assert_same_state(full_state(run), before)  # nothing half-loaded
