"""Resume verifies the checksums of the files it reads (`checkpoint.verify`, on by default) and can opt out.

One flipped byte in a shard of the newest checkpoint (size unchanged, so only the checksum can tell) is
found, named (file and step) in a warning, and the previous checkpoint is loaded; with `verify: false`
the checksums are skipped (the corrupt step is loaded as it is); a bad `verify` value is one line
naming the field.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from meshweave.checkpoint import CheckpointFallbackWarning, Checkpointer, layout
from meshweave.checkpoint.settings import validate_checkpoint_settings
from tests.checkpoint_support import TinyRun, assert_same_state, full_state, settings

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Three committed steps of the tiny model, and the full state after each."""
    d = tmp_path_factory.mktemp("ck")
    run, states = TinyRun(), []
    ckpt = Checkpointer(settings(str(d), keep=3), None, 0, 1)
    for _ in range(3):
        run.step(ckpt)
        ckpt.wait()
        states.append(full_state(run))
    ckpt.close()
    return d, states


def _copy_with_flipped_shard_byte(src: Path, dst: Path, step: int) -> Path:
    import shutil

    shutil.copytree(src, dst)
    shard = dst / layout.step_dirname(step) / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.seek(os.path.getsize(shard) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x01]))
    return shard


def test_flipped_byte_in_a_shard_is_named_and_the_previous_step_loaded(tmp_path, saved):
    src, states = saved
    shard = _copy_with_flipped_shard_byte(src, tmp_path / "ck", 3)
    run = TinyRun(seed=7)
    with pytest.warns(CheckpointFallbackWarning) as caught:
        step = Checkpointer(settings(str(tmp_path / "ck")), None, 0, 1).load_latest(run.app_state)
    assert step == 2
    assert_same_state(full_state(run), states[1])
    message = str(caught[0].message)
    assert "\n" not in message and "checkpoint step 3" in message and str(shard) in message, message
    assert "checksum" in message and "falling back" in message, message


def test_verify_false_skips_the_checksums(tmp_path, saved):
    src, states = saved
    _copy_with_flipped_shard_byte(src, tmp_path / "ck", 3)
    run = TinyRun(seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointFallbackWarning)
        step = Checkpointer(settings(str(tmp_path / "ck"), verify=False), None, 0, 1).load_latest(run.app_state)
    assert step == 3  # the corrupt step, loaded unchecked: exactly what opting out means
    loaded = full_state(run)
    assert any(not _equal(loaded[k], states[2][k]) for k in loaded), "the flipped byte should have been loaded"


def test_verify_false_still_refuses_a_truncated_shard(tmp_path, saved):
    """Sizes are still compared (a stat, no read): a truncated file is never loaded."""
    import shutil

    src, states = saved
    shutil.copytree(src, tmp_path / "ck")
    shard = tmp_path / "ck" / layout.step_dirname(3) / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 4)
    run = TinyRun(seed=7)
    with pytest.warns(CheckpointFallbackWarning, match="size"):
        step = Checkpointer(settings(str(tmp_path / "ck"), verify=False), None, 0, 1).load_latest(run.app_state)
    assert step == 2
    assert_same_state(full_state(run), states[1])


def test_intact_checkpoint_loads_the_same_with_and_without_verification(saved):
    src, states = saved
    for verify in (True, False):
        run = TinyRun(seed=7)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CheckpointFallbackWarning)
            assert Checkpointer(settings(str(src), verify=verify), None, 0, 1).load_latest(run.app_state) == 3
        assert_same_state(full_state(run), states[2])


def test_bad_verify_value_is_one_line_naming_the_field():
    problems = validate_checkpoint_settings(settings("/tmp/x", verify="yes"))
    assert problems == ["checkpoint.verify: got 'yes'; use true (check checksums on resume) or false"]


def _equal(a, b) -> bool:  # noqa: ANN001
    import torch

    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
