"""Node-local checkpoints (checkpoint.node_local): each rank's own copy on its "node", persistent level beside.

Two FSDP2 ranks on gloo play two nodes: each sees `$NODE_SCRATCH` as its own directory (node0/, node1/),
as `$SLURM_TMPDIR` would be on a cluster. A restart on the same ranks resumes from the own copies; a
restart where a node lost its disk resumes from the persistent level; a corrupt copy on one rank makes
every rank fall back together; a directory that is meant to be shared but is not is a config error.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from meshweave.checkpoint import Checkpointer, CheckpointFallbackWarning, CheckpointLoadError, layout, node_local
from meshweave.core.errors import ConfigError
from meshweave.launch.cli import main
from meshweave.testing import run_distributed
from tests.checkpoint_support import TinyRun, full_state, same_state, settings

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
SCRATCH = "$NODE_SCRATCH/ckpt"  # expanded in each process: a different directory on each "node"


def _node_settings(base: str, writer: str):
    return settings(SCRATCH, every_steps=2, levels=["local", "persistent"], persistent_dir=f"{base}/persistent",
                    node_local=True, writer=writer)


@contextmanager
def _on_node(base: str) -> Iterator[None]:
    """This rank's NODE_SCRATCH set (pooled workers are reused: the variable is removed after)."""
    os.environ["NODE_SCRATCH"] = f"{base}/node{dist.get_rank()}"
    try:
        yield
    finally:
        os.environ.pop("NODE_SCRATCH", None)


def _setup(seed: int = 0) -> tuple[TinyRun, dist.ProcessGroup]:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    return TinyRun(mesh=mesh, seed=seed), dist.new_group(backend="gloo")


def _load(base: str, group: dist.ProcessGroup, writer: str) -> tuple[int | None, TinyRun, bool]:
    """A fresh model (other seed) resumes; returns the step, the run and whether a fallback warning was raised."""
    run, _ = _setup(seed=99)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = Checkpointer(_node_settings(base, writer), group, dist.get_rank(), dist.get_world_size())
        step = ckpt.load_latest(run.app_state)
        ckpt.close()
    return step, run, any(issubclass(w.category, CheckpointFallbackWarning) for w in caught)


def _drill(base: str, writer: str) -> dict:
    with _on_node(base):
        return _drill_on_node(base, writer)


def _drill_on_node(base: str, writer: str) -> dict:
    rank = dist.get_rank()
    reference, group = _setup()
    ref_losses = [reference.step() for _ in range(8)]
    states = {}
    run, _ = _setup()
    ckpt = Checkpointer(_node_settings(base, writer), group, rank, dist.get_world_size())
    assert ckpt.load_latest(run.app_state) is None  # nothing yet; and the look must not change the state
    losses = []
    for step in range(1, 7):  # saves at 2, 4, 6 on both levels
        losses.append(run.step(ckpt))
        if step in (4, 6):
            ckpt.wait()
            states[step] = full_state(run)
    ckpt.close()
    dist.barrier()
    out: dict = {"rank": rank, "first_run": losses == ref_losses[:6], "own_dirs": sorted(p.name for p in Path(f"{base}/node{rank}/ckpt").iterdir())}
    persistent6 = Path(f"{base}/persistent/{layout.step_dirname(6)}")
    aside = Path(f"{base}/aside")

    # 1. same ranks, same layout: the own copies; step 6 exists nowhere else (persistent's is moved aside)
    if rank == 0:
        persistent6.rename(aside)
    dist.barrier()
    step, resumed, warned = _load(base, group, writer)
    out["same_nodes"] = (step, same_state(full_state(resumed), states[6]), warned)
    out["continued"] = [resumed.step() for _ in range(2)] == ref_losses[6:8]

    # 2. rank 0's own copy of step 6 is corrupt: every rank falls back to step 4 together
    if rank == 0:
        _flip_a_byte(node_local.rank_dir(f"{base}/node0/ckpt", 0) / layout.step_dirname(6))
    dist.barrier()
    step, resumed, warned = _load(base, group, writer)
    out["corrupt"] = (step, same_state(full_state(resumed), states[4]), warned)

    # 3. node 1 lost its disk (a restart on another node): the persistent level, shared, has step 6
    dist.barrier()
    if rank == 0:
        aside.rename(persistent6)
        shutil.rmtree(f"{base}/node1")
    dist.barrier()
    step, resumed, warned = _load(base, group, writer)
    out["node_lost"] = (step, same_state(full_state(resumed), states[6]), warned)
    dist.destroy_process_group(group)
    return out


def _flip_a_byte(step_dir: Path) -> None:
    data = next(p for p in step_dir.iterdir() if p.suffix == ".distcp")
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1
    data.write_bytes(bytes(raw))



@pytest.mark.parametrize("writer", ["thread", pytest.param("process", marks=pytest.mark.slow)])
def test_own_copies_resume_on_the_same_nodes_and_the_persistent_level_elsewhere(tmp_path, writer, capsys):
    results = run_distributed(_drill, 2, str(tmp_path), writer, timeout=300)
    for res in results:
        assert res["first_run"], "a run with node-local checkpoints trains differently from one without"
        assert res["own_dirs"] == [f"rank_{res['rank']:05d}"]  # a node holds only its own ranks' copies
        assert res["same_nodes"] == (6, True, False), res
        assert res["continued"], "training after the resume differs from the uninterrupted run"
        assert res["corrupt"][:2] == (4, True), res
        assert res["node_lost"] == (6, True, False), res
    assert results[0]["corrupt"][2]  # the rank that found the damage warns
    copy = node_local.rank_dir(str(tmp_path / "node0" / "ckpt"), 0) / layout.step_dirname(4)
    assert layout.read_manifest(copy)["world_size"] == 1 and (copy / node_local.INFO).is_file()
    # `meshweave ckpt verify` on a node's directory checks every rank's copies there (step 6 was damaged)
    assert main(["ckpt", "verify", str(tmp_path / "node0" / "ckpt")]) == 1
    report = capsys.readouterr().out
    assert f"CORRUPT {tmp_path}/node0/ckpt/rank_00000/step_000000006" in report and "2 intact, 1 corrupt" in report


def _save_two_steps(base: str) -> None:
    with _on_node(base):
        run, group = _setup()
        ckpt = Checkpointer(_node_settings(base, "thread"), group, dist.get_rank(), dist.get_world_size())
        for _ in range(4):  # saves at 2 and 4
            run.step(ckpt)
        ckpt.close()
        dist.destroy_process_group(group)


def _load_alone(base: str, node: str) -> tuple[int | None, str]:
    """One process, as rank 0 of a world of 1, on `node`'s disk: its copies are rank 0's of a world of 2."""
    os.environ["NODE_SCRATCH"] = f"{base}/{node}"
    try:
        run = TinyRun(seed=99)
        ckpt = Checkpointer(_node_settings(base, "thread"), None, 0, 1)
        try:
            return ckpt.load_latest(run.app_state), ""
        except CheckpointLoadError as err:
            return None, str(err)
        finally:
            ckpt.close()
    finally:
        os.environ.pop("NODE_SCRATCH", None)


def test_copies_of_another_layout_are_never_loaded_and_never_silently_skipped(tmp_path):
    run_distributed(_save_two_steps, 2, str(tmp_path), timeout=300)
    # the persistent level (shared) reshards onto one process; the copies are not used
    assert _load_alone(str(tmp_path), "node0") == (4, "")
    # without it, starting over would silently drop 4 steps: refused, naming the ways out
    shutil.rmtree(tmp_path / "persistent")
    step, message = _load_alone(str(tmp_path), "node0")
    assert step is None and "node-local copies up to step 4 were written under another layout" in message
    assert "checkpoint.resume: false" in message


def _unshared(base: str) -> str:
    group = dist.new_group(backend="gloo")
    try:
        with _on_node(base):
            Checkpointer(settings(SCRATCH), group, dist.get_rank(), dist.get_world_size())
        return "no error"
    except ConfigError as err:
        return str(err)
    finally:
        dist.destroy_process_group(group)


def test_a_local_directory_that_is_not_shared_is_a_config_error_naming_node_local(tmp_path):
    messages = run_distributed(_unshared, 2, str(tmp_path), timeout=120)
    for msg in messages:
        assert "is not shared by all ranks (rank(s) [1]" in msg and "checkpoint.node_local: true" in msg, msg
    assert not list(tmp_path.rglob(".meshweave-shared-probe-*"))  # the probe file is removed


def test_a_copy_fits_only_its_rank_world_size_and_layout(tmp_path):
    tensors = {"model/w": torch.zeros(4, 2), "optimizer/state.w.exp_avg": torch.zeros(4, 2)}
    expect = node_local.info(1, 2, tensors)
    step_dir = node_local.rank_dir(str(tmp_path), 1) / layout.step_dirname(3)
    step_dir.mkdir(parents=True)
    (step_dir / node_local.INFO).write_text(json.dumps(expect))
    assert node_local.own_steps(str(tmp_path), expect) == ([3], None)
    assert node_local.own_steps(str(tmp_path), node_local.info(1, 4, tensors)) == ([], 3)  # other world size
    other = dict(tensors, **{"model/w": torch.zeros(2, 2)})
    assert node_local.own_steps(str(tmp_path), node_local.info(1, 2, other)) == ([], 3)  # other shard shape
    assert node_local.own_steps(str(tmp_path), node_local.info(0, 2, tensors)) == ([], None)  # rank 0 has no copies
    # the optimizer's state is left out (reading it early would initialise it): its shapes do not count
    assert node_local.info(1, 2, dict(tensors, **{"optimizer/state.w.exp_avg": torch.zeros(9)})) == expect


def test_directories_expand_environment_variables_and_name_an_unset_one(monkeypatch):
    monkeypatch.setenv("NODE_SCRATCH", "/scratch/job7")
    monkeypatch.delenv("MW_UNSET_VAR", raising=False)
    cfg = settings(SCRATCH, persistent_dir="${MW_UNSET_VAR}/ckpt", levels=["local", "persistent"])
    assert cfg.level_dir("local") == "/scratch/job7/ckpt"
    with pytest.raises(ConfigError, match=r"checkpoint.persistent_dir: .*\$MW_UNSET_VAR, which is not set"):  # exit 2
        cfg.level_dir("persistent")
