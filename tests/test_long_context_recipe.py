"""The long-context recipe (issue 14 item 5), scaled down, end to end through `meshweave recipe`.

Three stages of a tiny llama, seq 64 -> 128 -> 256, RoPE base raised, sp 1 -> 2 -> 2 (dp 2 -> 1 -> 1) on
two processes. Each stage resumes the previous stage's final checkpoint under the new layout: the step
counter continues, and the loss is continuous across each boundary (the first loss of stage k+1 is
near the last losses of stage k, far below the loss the model started at). The data position carries
over in tokens (DistributedSampler with row_tokens); unit-tested here without processes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from meshweave.data.text import DistributedSampler, SamplerStateError
from meshweave.launch.cli import main
from meshweave.launch.recipe import load_recipe
from meshweave.testing_equivalence import SMALL_TEST_CONFIG

STAGES = [  # (name, steps, seq_len, rope_theta, sp)
    ("s64", 16, 64, 10000, 1),
    ("s128", 4, 128, 40000, 2),
    ("s256", 4, 256, 160000, 2),
]


def _recipe(tmp_path: Path, stages=STAGES, extra: dict | None = None) -> Path:
    common = [o for o in SMALL_TEST_CONFIG if not o.startswith(("train.seq_len", "train.warmup_steps", "train.lr",
                                                                  "logging."))]
    raw = {
        "run_dir": str(tmp_path / "run"),
        "set": [*common, "train.lr=3e-3", "train.warmup_steps=2", "train.global_batch=4", "logging.every_steps=1",
                "logging.jsonl=true", "parallel.sp_method=ring"],
        "stages": [{"name": n, "steps": s, "set": {"train.seq_len": L, "model.rope_theta": theta, "parallel.sp": sp}}
                   for n, s, L, theta, sp in stages],
        **(extra or {}),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    path = run_dir / "metrics" / "rank0.jsonl"
    return [(r["step"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.mark.slow
def test_three_stages_resume_each_other_with_continuous_loss(tmp_path):
    recipe = _recipe(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "meshweave", "recipe", str(recipe), "--nproc", "2"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    per_stage = [_losses(tmp_path / "run" / name) for name, *_ in STAGES]
    end = 0
    for (name, steps, *_), losses in zip(STAGES, per_stage):
        assert [s for s, _ in losses] == list(range(end + 1, end + steps + 1)), f"{name}: the step counter must continue"
        end += steps
    assert proc.stdout.count("resumed from checkpoint") == len(STAGES) - 1, proc.stdout[-3000:]
    initial = per_stage[0][0][1]
    for k in range(len(STAGES) - 1):
        last = min(loss for _, loss in per_stage[k][-3:])
        first_next = per_stage[k + 1][0][1]
        drop = initial - last
        assert drop > 1.0, f"stage {k} did not learn: {initial:.3f} -> {last:.3f}"
        # continuous: the new stage starts within a quarter of the learned drop of where the last one ended
        assert first_next - last < 0.25 * drop, (k, initial, last, first_next)


def test_dry_run_checks_every_stage_and_prints_commands(tmp_path, capsys):
    assert main(["recipe", str(_recipe(tmp_path)), "--nproc", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "s64: steps 1-16" in out and "s256: steps 21-24" in out and out.count("--set checkpoint.resume=true") == 3


def test_a_bad_stage_fails_before_anything_runs(tmp_path, capsys):
    stages = [*STAGES[:2], ("bad", 2, 100, 10000, 3)]  # sp 3 does not divide 2 processes
    assert main(["recipe", str(_recipe(tmp_path, stages)), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "recipe stage 'bad'" in err and "parallel" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("extra,message", [
    ({"stages": []}, "at least one stage"),
    ({"colour": 1}, "unknown key 'colour'"),
    ({"base": "missing.yaml"}, "is not a file"),
])
def test_recipe_file_errors_are_one_line(tmp_path, capsys, extra, message):
    assert main(["recipe", str(_recipe(tmp_path, extra=extra))]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_shipped_recipe_checks_for_eight_processes(capsys):
    recipe = Path(__file__).resolve().parents[1] / "configs" / "long_context" / "recipe.yaml"
    assert main(["recipe", str(recipe), "--nproc", "8", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "seq_len 1024  sp 1" in out and "seq_len 8192  sp 4" in out and "seq_len 32768  sp 8" in out


def test_rerun_skips_the_stages_a_checkpoint_already_covers(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints" / "step_000000018").mkdir(parents=True)  # inside stage s128 (17-20)
    assert main(["recipe", str(_recipe(tmp_path)), "--nproc", "2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "stage s64: done (checkpoint at step 18)" in out
    assert "stage s128: meshweave train" in out and "stage s256: meshweave train" in out


def test_stage_steps_accumulate(tmp_path):
    recipe = load_recipe(_recipe(tmp_path))
    assert [s.end_step for s in recipe.stages] == [16, 20, 24]


def test_sampler_position_carries_over_in_tokens():
    """A state saved at row length 64 resumes at row length 128 after the same number of tokens (rounded up)."""
    corpus = 64 * 100 + 5  # tokens: (corpus - 1) // row_tokens rows
    short = DistributedSampler((corpus - 1) // 64, 4, 0, 2, seed=3, row_tokens=64)
    for _ in range(7):
        short.next_global_rows()  # 28 rows of 64 = 1792 tokens
    long = DistributedSampler((corpus - 1) // 128, 2, 0, 1, seed=3, row_tokens=128)
    long.load_state_dict(short.state_dict(), allow_dp_change=True)
    assert long.tokens_consumed() == 14 * 128 == short.tokens_consumed()
    short.position = 29  # 1856 tokens: 14.5 rows of 128, rounded up
    long.load_state_dict(short.state_dict(), allow_dp_change=True)
    assert (long.epoch, long.position) == (0, 15)


def test_sampler_refuses_another_corpus_or_seed_at_another_row_length():
    saved = DistributedSampler(100, 4, 0, 2, seed=3, row_tokens=64).state_dict()
    with pytest.raises(SamplerStateError, match="dataset or seed changed"):
        DistributedSampler(20, 2, 0, 1, seed=3, row_tokens=128).load_state_dict(saved)  # a quarter of the corpus
    with pytest.raises(SamplerStateError, match="dataset or seed changed"):
        DistributedSampler(50, 2, 0, 1, seed=4, row_tokens=128).load_state_dict(saved)
