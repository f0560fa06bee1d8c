"""Checkpointer under FSDP2 on gloo: 2-rank exact resume (lazy and sync), crash-free agreement, 4 -> 2 resharding."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from meshweave.checkpoint import Checkpointer, CheckpointFallbackWarning, layout
from meshweave.testing import run_distributed
from tests.checkpoint_support import TinyRun, assert_same_state, full_state, same_state, settings

# DCP warns on every single-process call that it runs single-process: that is intended here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _setup(seed: int = 0) -> tuple[TinyRun, dist.ProcessGroup]:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    group = dist.new_group(backend="gloo")  # the dedicated checkpoint group the runtime would create
    return TinyRun(mesh=mesh, seed=seed), group


def _checkpointer(cfg, group) -> Checkpointer:
    return Checkpointer(cfg, group, dist.get_rank(), dist.get_world_size())


def _resume_fsdp(directory: str, mode: str) -> dict:
    """Reference 6 steps; then 5 steps saving every 2, a fresh model loads step 4 and runs 2 more."""
    rank = dist.get_rank()
    ref_run, group = _setup()
    reference = [ref_run.step() for _ in range(6)]
    cfg = settings(directory, every_steps=2, mode=mode)
    first, _ = _setup()
    ckpt = _checkpointer(cfg, group)
    head = [first.step(ckpt) for _ in range(4)]
    at_4 = full_state(first)
    first.step(ckpt)
    ckpt.close()
    resumed, _ = _setup(seed=42)
    ckpt = _checkpointer(cfg, group)
    step = ckpt.load_latest(resumed.app_state)
    loaded = full_state(resumed)
    tail = [resumed.step(ckpt) for _ in range(2)]
    ckpt.close()
    dist.destroy_process_group(group)
    return {"rank": rank, "step": step, "reference": reference, "resumed": head + tail,
            "state_ok": same_state(loaded, at_4), "loaded": loaded if rank == 0 else None}



def test_fsdp_two_ranks_lazy_and_sync_resume_exactly_and_agree(tmp_path):
    loaded = {}
    for mode in ("lazy", "sync"):
        results = run_distributed(_resume_fsdp, 2, str(tmp_path / mode), mode, timeout=300)
        for res in results:
            assert res["step"] == 4 and res["state_ok"], (mode, res["rank"])
            assert res["resumed"] == res["reference"], (mode, res["rank"])
        loaded[mode] = results[0]["loaded"]
    assert_same_state(loaded["lazy"], loaded["sync"])


def _save_sharded(directory: str, steps: int) -> dict:
    run, group = _setup()
    ckpt = _checkpointer(settings(directory, every_steps=steps), group)
    for _ in range(steps):
        run.step(ckpt)
    ckpt.close()
    state = full_state(run)
    dist.destroy_process_group(group)
    return {"state": state, "position": run.sampler.position, "rng": torch.get_rng_state()}


def _load_sharded(directory: str) -> dict:
    run, group = _setup(seed=77)
    ckpt = _checkpointer(settings(directory), group)
    step = ckpt.load_latest(run.app_state)
    state = full_state(run)
    ckpt.close()
    dist.destroy_process_group(group)
    return {"step": step, "state": state, "position": run.sampler.position, "trainer_step": run.trainer.step,
            "rng": torch.get_rng_state(), "lr": run.opt.param_groups[0]["lr"]}


@pytest.mark.slow
def test_save_on_four_ranks_load_on_two_full_tensor_equality(tmp_path):
    saved = run_distributed(_save_sharded, 4, str(tmp_path), 3, timeout=300)
    loaded = run_distributed(_load_sharded, 2, str(tmp_path), timeout=300)
    for res in loaded:
        assert res["step"] == 3 and res["trainer_step"] == 3
        assert_same_state(res["state"], saved[0]["state"])
        assert res["position"] == saved[0]["position"] == 3 * 4  # global position: no skip, no repeat
        assert torch.equal(res["rng"], saved[0]["rng"])  # per-rank state from saved rank 0 (world changed)
    assert any(k.startswith("optimizer/state.") for k in saved[0]["state"])


def _corrupt_on_rank1_then_load(directory: str) -> dict:
    """Rank 1 alone sees a flipped byte in its share: every rank must still pick the same older step."""
    run, group = _setup()
    ckpt = _checkpointer(settings(directory, every_steps=1), group)
    for _ in range(2):
        run.step(ckpt)
    ckpt.close()
    dist.barrier()
    if dist.get_rank() == 0:
        manifest = layout.read_manifest(f"{directory}/{layout.step_dirname(2)}")
        name = sorted(manifest["files"])[1]  # verified by rank 1 (strided share)
        path = f"{directory}/{layout.step_dirname(2)}/{name}"
        with open(path, "r+b") as f:
            f.seek(0)
            byte = f.read(1)
            f.seek(0)
            f.write(bytes([byte[0] ^ 1]))
    dist.barrier()
    fresh, _ = _setup(seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = _checkpointer(settings(directory), group).load_latest(fresh.app_state)
    dist.destroy_process_group(group)
    return {"step": step, "warned": any(issubclass(w.category, CheckpointFallbackWarning) for w in caught)}


def test_ranks_agree_on_fallback_when_one_rank_finds_corruption(tmp_path):
    results = run_distributed(_corrupt_on_rank1_then_load, 2, str(tmp_path), timeout=300)
    assert [r["step"] for r in results] == [1, 1]
    assert results[1]["warned"]


def _train_until_rank1_dies(directory: str) -> None:
    """Rank 1 SIGKILLs itself in step 2's save, after writing its data files, before the commit."""
    import os

    from meshweave.checkpoint.crash import ENV_POINT, ENV_RANK

    if dist.get_rank() == 1:
        os.environ.update({ENV_POINT: "write:local@2", ENV_RANK: "1"})
    run, group = _setup()
    ckpt = _checkpointer(settings(directory, every_steps=1), group)
    for _ in range(3):
        run.step(ckpt)
    ckpt.close()  # rank 0 fails here or earlier: its peer is gone


def _state_after(steps: int) -> dict:
    run, _ = _setup()
    for _ in range(steps):
        run.step()
    return full_state(run)


@pytest.mark.slow
def test_rank_killed_mid_save_leaves_previous_checkpoint_in_force(tmp_path):
    from meshweave.testing import DistributedTestError

    with pytest.raises(DistributedTestError):
        run_distributed(_train_until_rank1_dies, 2, str(tmp_path), timeout=120)
    assert layout.committed_steps(tmp_path) == [1] and layout.read_pointer(tmp_path) == 1
    expected = run_distributed(_state_after, 2, 1)[0]
    loaded = run_distributed(_load_sharded, 2, str(tmp_path), timeout=300)
    for res in loaded:
        assert res["step"] == 1
        assert_same_state(res["state"], expected)


def _fsdp_stages_one_optimizer(directory: str) -> bool:
    """Two FSDP2-sharded stages with one optimizer (virtual pipeline stages on a rank) round-trip."""
    import copy

    from torch.distributed.fsdp import fully_shard

    from meshweave.checkpoint import ModelState, OptimizerState
    from meshweave.models.llama.model import Transformer
    from tests.checkpoint_support import TINY

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    group = dist.new_group(backend="gloo")

    def build(seed: int):
        torch.manual_seed(seed)
        whole = Transformer(TINY)
        first, second = copy.deepcopy(whole), copy.deepcopy(whole)
        del first.layers["1"]
        first.norm = first.output = None
        del second.layers["0"]
        second.tok_embeddings = None
        for stage in (first, second):
            fully_shard(stage, mesh=mesh)
        opt = torch.optim.AdamW([p for s in (first, second) for p in s.parameters()], lr=3e-3)
        return [first, second], opt

    stages, opt = build(0)
    tokens = torch.randint(0, TINY.vocab_size, (2, 8))
    stages[1](stages[0](tokens)).square().mean().backward()
    opt.step()
    saved = {"model": ModelState(stages), "optimizer": OptimizerState(stages, [opt])}
    ckpt = Checkpointer(settings(directory, every_steps=1), group, dist.get_rank(), 2, replicated_keys=())
    ckpt.after_optimizer_step(1, saved)
    ckpt.close()
    fresh, fresh_opt = build(9)
    target = {"model": ModelState(fresh), "optimizer": OptimizerState(fresh, [fresh_opt])}
    step = Checkpointer(settings(directory), group, dist.get_rank(), 2, replicated_keys=()).load_latest(target)
    dist.destroy_process_group(group)
    full = lambda app: {k: v.full_tensor() if hasattr(v, "full_tensor") else v  # noqa: E731
                        for k, v in _flat_state(app).items()}
    return step == 1 and same_state(full(target), full(saved))


def _flat_state(app) -> dict:
    from meshweave.checkpoint.state import flatten

    return flatten({k: v.state_dict() for k, v in app.items()})


def test_fsdp_stages_sharing_one_optimizer_round_trip(tmp_path):
    assert run_distributed(_fsdp_stages_one_optimizer, 2, str(tmp_path), timeout=300) == [True, True]
