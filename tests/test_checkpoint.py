"""Checkpointer on one process: exact resume, lazy == sync, lazy overlap, levels, retention, pipeline parts."""

from __future__ import annotations

import copy
import os
import shutil
import threading

import pytest
import torch

from meshweave.checkpoint import (
    CheckpointFallbackWarning, Checkpointer, CheckpointSettings, ModelState, OptimizerState,
    validate_checkpoint_settings,
)
from meshweave.checkpoint import layout
from meshweave.checkpoint.codec import dumps, loads
from meshweave.models.llama.model import Transformer
from tests.checkpoint_support import (  # noqa: F401 - one_intra_op_thread is an autouse fixture
    TINY, TinyRun, assert_same_state, full_state, one_intra_op_thread, settings,
)

# DCP warns on every single-process call that it runs single-process: that is intended here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _train(run: TinyRun, steps: int, ckpt: Checkpointer | None = None) -> list[float]:
    return [run.step(ckpt) for _ in range(steps)]


def _load_fresh(cfg: CheckpointSettings) -> tuple[TinyRun, int | None]:
    run = TinyRun(seed=123)  # different init: everything must come from the checkpoint
    ckpt = Checkpointer(cfg, None, 0, 1)
    step = ckpt.load_latest(run.app_state)
    ckpt.close()
    return run, step


@pytest.mark.parametrize("mode", ["lazy", "sync"])
def test_resume_gives_bitwise_same_losses_as_never_stopping(tmp_path, mode):
    reference = _train(TinyRun(), 8)
    cfg = settings(str(tmp_path), every_steps=2, mode=mode)
    first = TinyRun()
    ckpt = Checkpointer(cfg, None, 0, 1)
    head = _train(first, 5, ckpt)  # checkpoints at 2 and 4; step 5 is lost
    ckpt.close()
    resumed, step = _load_fresh(cfg)
    assert step == 4 and resumed.trainer.step == 4 and resumed.sampler.position == 4 * 4
    tail = _train(resumed, 4)
    assert head[:4] + tail == reference


def test_lazy_and_sync_checkpoints_hold_identical_state(tmp_path):
    states = {}
    for mode in ("lazy", "sync"):
        run = TinyRun()
        ckpt = Checkpointer(settings(str(tmp_path / mode), every_steps=3, mode=mode), None, 0, 1)
        _train(run, 3, ckpt)
        at_step_3 = full_state(run)
        _train(run, 1, ckpt)  # the live state moves on; the checkpoint must not
        ckpt.close()
        loaded, step = _load_fresh(settings(str(tmp_path / mode), mode=mode))
        assert step == 3
        states[mode] = full_state(loaded)
        assert_same_state(states[mode], at_step_3)
        assert torch.equal(loaded.trainer.state_dict()["rng"], _rng_after_steps(3))
    assert_same_state(states["lazy"], states["sync"])


def _rng_after_steps(n: int) -> torch.Tensor:
    run = TinyRun()
    _train(run, n)
    return torch.get_rng_state()


def test_after_step_returns_before_copy_and_before_step_waits_for_it(tmp_path):
    entered, gate, order = threading.Event(), threading.Event(), []

    def slow_copy(key: str) -> None:
        entered.set()
        gate.wait()  # hold the copy until the test lets it go

    run = TinyRun()
    ckpt = Checkpointer(settings(str(tmp_path), every_steps=1), None, 0, 1, copy_hook=slow_copy)
    _train(run, 1, ckpt)  # after_optimizer_step(1) started the copy and returned
    assert entered.wait(30) and not ckpt.snapshot.is_copied()
    expected = full_state(run)
    loss = run.model(torch.randint(0, TINY.vocab_size, (2, 8))).sum()  # next forward/backward overlap the copy
    loss.backward()
    waiter = threading.Thread(target=lambda: (ckpt.before_optimizer_step(), order.append("before returned")))
    waiter.start()
    waiter.join(0.3)
    assert order == [] and waiter.is_alive()  # the copy is held, so the optimizer step must wait
    order.append("copy released")
    gate.set()
    waiter.join(30)
    assert order == ["copy released", "before returned"] and len(ckpt.stats.stall_before_s) == 1
    run.opt.zero_grad()
    ckpt.close()
    loaded, step = _load_fresh(settings(str(tmp_path)))
    assert step == 1
    assert_same_state(full_state(loaded), expected)


def test_retention_keeps_newest_and_pointer_names_newest(tmp_path):
    run = TinyRun()
    ckpt = Checkpointer(settings(str(tmp_path), every_steps=1, keep=2), None, 0, 1)
    _train(run, 5, ckpt)
    ckpt.close()
    assert layout.committed_steps(tmp_path) == [5, 4]
    assert layout.read_pointer(tmp_path) == 5
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    manifest = layout.read_manifest(tmp_path / layout.step_dirname(5))
    assert manifest["step"] == 5 and layout.verify_files(tmp_path / layout.step_dirname(5), manifest) == []


def test_every_steps_zero_saves_only_the_final_step(tmp_path):
    run = TinyRun()
    ckpt = Checkpointer(settings(str(tmp_path), every_steps=0), None, 0, 1, final_step=3)
    _train(run, 3, ckpt)
    ckpt.close()
    assert layout.committed_steps(tmp_path) == [3]


def test_persistent_level_recovers_when_local_is_gone_or_corrupt(tmp_path):
    local, shared = tmp_path / "local", tmp_path / "shared"
    cfg = settings(str(local), every_steps=2, levels=["local", "persistent"], persistent_dir=str(shared))
    run = TinyRun()
    ckpt = Checkpointer(cfg, None, 0, 1)
    _train(run, 4, ckpt)
    ckpt.close()
    at_4 = full_state(run)
    assert layout.committed_steps(local) == layout.committed_steps(shared) == [4, 2]
    assert layout.read_pointer(shared) == 4
    _truncate(local / layout.step_dirname(4) / "__0_0.distcp")
    with pytest.warns(CheckpointFallbackWarning, match="step 4"):
        loaded, step = _load_fresh(cfg)
    assert step == 4  # same step, from the persistent level
    assert_same_state(full_state(loaded), at_4)
    shutil.rmtree(local)
    loaded, step = _load_fresh(cfg)
    assert step == 4
    assert_same_state(full_state(loaded), at_4)


def _truncate(path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_memory_level_restores_in_process_without_disk(tmp_path):
    cfg = settings(str(tmp_path), every_steps=2, levels=["memory", "local"])
    run = TinyRun()
    ckpt = Checkpointer(cfg, None, 0, 1)
    _train(run, 2, ckpt)
    ckpt.wait()
    at_2, rng_2 = full_state(run), run.trainer.state_dict()["rng"]
    _train(run, 1, ckpt)  # step 3: not saved, live state diverges
    shutil.rmtree(tmp_path)  # the disk copy is gone: only the host snapshot can serve
    assert ckpt.load_latest(run.app_state) == 2
    ckpt.close()
    assert_same_state(full_state(run), at_2)
    assert torch.equal(torch.get_rng_state(), rng_2) and run.sampler.position == 8


def _stages(model: Transformer) -> list[Transformer]:
    """Two pipeline stages of a copy of `model` that keep the original parameter names."""
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    del first.layers["1"]
    first.norm = first.output = None
    del second.layers["0"]
    second.tok_embeddings = None
    return [first, second]


def test_pipeline_stages_save_and_load_into_one_unsplit_model(tmp_path):
    torch.manual_seed(0)
    stages = _stages(Transformer(TINY))
    opts = [torch.optim.AdamW(s.parameters(), lr=1e-2) for s in stages]
    tokens = torch.randint(0, TINY.vocab_size, (2, 8))
    for _ in range(2):
        stages[1](stages[0](tokens)).square().mean().backward()
        for o in opts:
            o.step()
            o.zero_grad()
    saved = {"model": ModelState(stages), "optimizer": OptimizerState(stages, opts)}
    ckpt = Checkpointer(settings(str(tmp_path), every_steps=1), None, 0, 1, replicated_keys=())
    ckpt.after_optimizer_step(2, saved)
    ckpt.close()

    torch.manual_seed(7)
    whole = Transformer(TINY)
    opt = torch.optim.AdamW(whole.parameters(), lr=1e-3)
    target = {"model": ModelState([whole]), "optimizer": OptimizerState([whole], [opt])}
    assert Checkpointer(settings(str(tmp_path)), None, 0, 1, replicated_keys=()).load_latest(target) == 2
    assert_same_state(_flat(target), _flat(saved))
    assert opt.param_groups[0]["lr"] == 1e-2


def _flat(app_state) -> dict:
    from meshweave.checkpoint.state import flatten

    return flatten({k: v.state_dict() for k, v in app_state.items()})


def test_no_checkpoint_gives_none_and_resume_off_skips_loading(tmp_path):
    run = TinyRun()
    assert Checkpointer(settings(str(tmp_path / "empty")), None, 0, 1).load_latest(run.app_state) is None
    ckpt = Checkpointer(settings(str(tmp_path), every_steps=1), None, 0, 1)
    _train(run, 1, ckpt)
    ckpt.close()
    assert Checkpointer(settings(str(tmp_path), resume=False), None, 0, 1).load_latest(TinyRun().app_state) is None
    off = Checkpointer(CheckpointSettings(dir=None), None, 0, 1)
    off.after_optimizer_step(1, run.app_state)
    assert off.stats.started == 0 and off.load_latest(run.app_state) is None


@pytest.mark.parametrize("kw, field", [
    ({"mode": "async"}, "checkpoint.mode"),
    ({"keep": 0}, "checkpoint.keep"),
    ({"every_steps": -1}, "checkpoint.every_steps"),
    ({"levels": ["persistent"]}, "'persistent' needs checkpoint.persistent_dir"),
    ({"levels": ["local", "memory"]}, "out of order"),
    ({"levels": ["memory"]}, "'memory' alone"),
    ({"levels": ["disk"]}, "unknown level"),
    ({"node_local": True, "levels": ["persistent"], "persistent_dir": "p"}, "checkpoint.node_local: true needs 'local'"),
])
def test_settings_validation_names_field_and_fix(kw, field):
    problems = validate_checkpoint_settings(CheckpointSettings(dir="x", **kw))
    assert len(problems) == 1 and field in problems[0], problems
    with pytest.raises(ValueError, match="invalid checkpoint settings"):
        Checkpointer(CheckpointSettings(dir="x", **kw), None, 0, 1)


def test_defaults_are_valid_and_codec_round_trips_plain_state():
    assert validate_checkpoint_settings(CheckpointSettings()) == []
    value = {"t": (1, 2.5, float("inf")), 3: [None, True], "rng": torch.get_rng_state(), "h": torch.ones(2, dtype=torch.bfloat16)}
    back = loads(dumps(value))
    assert back["t"] == value["t"] and back[3] == value[3]
    assert torch.equal(back["rng"], value["rng"]) and back["h"].dtype == torch.bfloat16
    with pytest.raises(TypeError, match="no pickling"):
        dumps({"f": object()})


def test_failed_background_save_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    run = TinyRun()
    ckpt = Checkpointer(settings(str(blocker / "ckpt"), every_steps=1), None, 0, 1)
    run.step(ckpt)
    with pytest.raises(OSError):
        ckpt.close()
    assert ckpt.stats.failed == 1
    warn = Checkpointer(settings(str(blocker / "ckpt"), every_steps=1), None, 0, 1, on_error="warn")
    run.step(warn)
    warn.close()  # logged, training goes on
    assert warn.stats.failed == 1 and warn.stats.committed == 0


def test_ckpt_list_and_verify_report_state_and_exit_codes(tmp_path, capsys):
    from meshweave.checkpoint.inspect import ckpt_main, list_checkpoints, verify_checkpoint

    run = TinyRun()
    ckpt = Checkpointer(settings(str(tmp_path), every_steps=1), None, 0, 1)
    _train(run, 2, ckpt)
    ckpt.close()
    (tmp_path / layout.tmp_dirname(3)).mkdir()  # a save killed mid-way
    infos = list_checkpoints(tmp_path)
    assert [(i.step, i.status, i.is_latest) for i in infos] == [(3, "incomplete", False), (2, "committed", True),
                                                               (1, "committed", False)]
    assert infos[1].world_size == 1 and infos[1].bytes > 0
    assert ckpt_main(["list", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "incomplete" in table and "committed" in table
    assert ckpt_main(["verify", str(tmp_path)]) == 0
    _truncate(tmp_path / layout.step_dirname(1) / "__0_0.distcp")
    assert any("truncated" in p for p in verify_checkpoint(tmp_path / layout.step_dirname(1)))
    assert ckpt_main(["verify", str(tmp_path)]) == 1
    assert "1 intact, 1 corrupt" in capsys.readouterr().out
    assert ckpt_main(["verify", str(tmp_path / "nope")]) == 2
    assert ckpt_main(["bogus"]) == 2


def test_loading_into_a_different_model_is_a_clear_error(tmp_path):
    from meshweave.checkpoint import CheckpointLoadError
    from meshweave.models.llama.config import LlamaConfig

    run = TinyRun()
    ckpt = Checkpointer(settings(str(tmp_path), every_steps=1), None, 0, 1)
    run.step(ckpt)
    ckpt.close()
    other = Transformer(LlamaConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_hidden=48))
    app = {"model": ModelState([other])}
    with pytest.raises(CheckpointLoadError, match="does not fit"):
        Checkpointer(settings(str(tmp_path)), None, 0, 1).load_latest(app)


def test_host_buffers_are_allocated_once_and_reused(tmp_path):
    run = TinyRun()
    ckpt = Checkpointer(settings(str(tmp_path), every_steps=1, keep=1), None, 0, 1)
    run.step(ckpt)
    ckpt.wait()
    pointers = {k: b.data_ptr() for k, b in ckpt.snapshot.buffers.items()}
    allocated = ckpt.snapshot.allocated_bytes
    for _ in range(6):
        run.step(ckpt)
    ckpt.close()
    assert {k: b.data_ptr() for k, b in ckpt.snapshot.buffers.items()} == pointers
    leaves = [v for v in full_state(run).values() if isinstance(v, torch.Tensor)]  # weights, moments, step counters
    assert ckpt.snapshot.allocated_bytes == allocated == sum(v.numel() * v.element_size() for v in leaves)
    assert ckpt.stats.committed == 7 and layout.committed_steps(tmp_path) == [7]


def test_one_optimizer_over_two_pipeline_stages_round_trips(tmp_path):
    torch.manual_seed(0)
    stages = _stages(Transformer(TINY))
    opt = torch.optim.AdamW([p for s in stages for p in s.parameters()], lr=3e-3)
    tokens = torch.randint(0, TINY.vocab_size, (2, 8))
    stages[1](stages[0](tokens)).square().mean().backward()
    opt.step()
    saved = {"model": ModelState(stages), "optimizer": OptimizerState(stages, [opt])}
    ckpt = Checkpointer(settings(str(tmp_path), every_steps=1), None, 0, 1, replicated_keys=())
    ckpt.after_optimizer_step(1, saved)
    ckpt.close()
    torch.manual_seed(7)
    fresh = _stages(Transformer(TINY))
    fresh_opt = torch.optim.AdamW([p for s in fresh for p in s.parameters()], lr=1e-3)
    target = {"model": ModelState(fresh), "optimizer": OptimizerState(fresh, [fresh_opt])}
    assert Checkpointer(settings(str(tmp_path)), None, 0, 1, replicated_keys=()).load_latest(target) == 1
    assert_same_state(_flat(target), _flat(saved))
    assert any(k.startswith("optimizer/state.layers.1.") for k in _flat(saved))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA staging path needs a GPU (its CPU twin runs above)")
def test_cuda_snapshot_is_ordered_after_an_unsynchronised_optimizer_step(tmp_path):
    torch.manual_seed(0)
    model = Transformer(TINY).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    app = {"model": ModelState([model]), "optimizer": OptimizerState([model], [opt])}
    ckpt = Checkpointer(settings(str(tmp_path), every_steps=1), None, 0, 1, replicated_keys=())
    model(torch.randint(0, TINY.vocab_size, (2, 8), device="cuda")).sum().backward()
    opt.step()  # queued on the compute stream, not synchronised
    ckpt.after_optimizer_step(1, app)
    ckpt.before_optimizer_step()
    expected = {k: v.detach().cpu() for k, v in app["model"].state_dict().items()}
    for key, value in expected.items():
        buf = ckpt.snapshot.buffers[f"model/{key}"]
        assert buf.is_pinned() and torch.equal(buf, value), key
    ckpt.close()
    assert layout.committed_steps(tmp_path) == [1]
