"""Failures end with one line, continued: Ctrl-C / SIGTERM, a frozen peer, torchrun, four workers (see
tests/failure_support.py for what every drill asserts). A file of its own so that the suite's two workers can
run these drills beside tests/test_failures.py's."""

import os
import signal
import time

import pytest

from meshweave.launch.env import free_port
from tests.failure_support import (
    LONG,
    TINY,
    Run,
    assert_clean_end,
    assert_failed_run_dir,
    assert_no_run_dir,
    session_members,
    wait_until_catching,
    workers,
)


# --- interrupted ---------------------------------------------------------------------------
@pytest.mark.slow  # not in the fast subset: trains until interrupted
def test_ctrl_c_stops_every_rank_at_one_step_with_a_final_checkpoint(tmp_path):
    ckpt = tmp_path / "ck"
    run = Run(tmp_path, [*TINY, *LONG, "--set", f"run_dir={tmp_path}/run", "--set", f"checkpoint.dir={ckpt}"])
    run.wait_for_step(3)
    os.killpg(run.proc.pid, signal.SIGINT)  # what the terminal does: the launcher and every worker get it
    line = assert_clean_end(run, 130, "meshweave: interrupted at step ")
    step = int(line.split("at step ")[1].split(";")[0])
    assert f"final checkpoint in {ckpt}/step_{step:09d}" in line
    assert (ckpt / f"step_{step:09d}" / "manifest.json").is_file() and (ckpt / "latest").read_text().strip()


def test_sigterm_during_start_up_leaves_no_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    run = Run(tmp_path, [*TINY, "--set", f"run_dir={run_dir}"])
    wait_until_catching(run.proc.pid, signal.SIGTERM)  # meshweave's own handler is in place
    time.sleep(1.0)  # checks done or under way; no step yet
    run.proc.send_signal(signal.SIGTERM)
    assert_clean_end(run, 143, "meshweave: interrupted before training started; nothing was saved")
    assert_no_run_dir(run_dir)


@pytest.mark.slow  # waits out the watchdog
def test_rank_stuck_on_a_frozen_peer_is_ended_by_its_watchdog(tmp_path):
    """Rank 1 frozen (SIGSTOP) holds rank 0 in a collective: after SIGTERM rank 0 cannot reach a step
    boundary, its watchdog ends it; torch elastic kills the frozen one after the shutdown timeout."""
    run = Run(tmp_path, [*TINY, *LONG, "--set", f"run_dir={tmp_path}/run"], env={"MESHWEAVE_SHUTDOWN_TIMEOUT": "15"})
    run.wait_for_step(2)
    os.kill(max(workers(run.proc.pid, run.proc.pid)), signal.SIGSTOP)
    time.sleep(1.0)
    start = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    line = assert_clean_end(run, 143, "did not reach the next step boundary within 10 s of SIGTERM")
    assert line.startswith("meshweave: rank 0 failed in train step ") and time.monotonic() - start < 60


# --- under torchrun ------------------------------------------------------------------------
@pytest.mark.slow  # not in the fast subset: torchrun end to end
def test_failing_worker_under_torchrun_prints_one_line_of_its_own(tmp_path):
    run = Run(tmp_path, ["--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "meshweave", "train", *TINY,
                         "--set", f"run_dir={tmp_path}/run"], env={"MESHWEAVE_RAISE": "step:rank=1:step=2"},
              module=["torch.distributed.run"])
    code, lines = run.finish()
    ours = [line for line in lines if line.startswith("meshweave:")]
    assert code != 0 and len(ours) == 1 and ours[0].startswith("meshweave: rank 1 failed in train step 2"), lines
    assert not any("run_worker" in line for line in lines)  # no worker traceback (torchrun prints its own report)
    assert_failed_run_dir(tmp_path / "run", 1)
    deadline = time.monotonic() + 10
    while session_members(run.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_members(run.proc.pid) == []


# --- four workers, repeated: nothing is ever left behind -------------------------------------
FOUR = ["--nproc", "4", "--set", "train.global_batch=4"]


@pytest.mark.slow
@pytest.mark.parametrize("kind,rank", [("raise", 1), ("kill", 2), ("sigterm", 1)])
def test_four_workers_leave_nothing_behind(tmp_path, kind, rank):
    """A failing, a killed and an interrupted run of four workers (a rank other than 0 fails: the launcher must
    find its record among four); the data phase's failure is drilled on two workers above. The interrupted run
    is SIGTERM to the launcher only (a scheduler's kill) without checkpointing: its line must say so (this was a
    two-worker run of its own: the same drill, at half a minute of the suite)."""
    env = {"raise": {"MESHWEAVE_RAISE": f"step:rank={rank}:step=2"}}
    run = Run(tmp_path, [*TINY, *FOUR, *(LONG if kind in ("kill", "sigterm") else []), "--set", f"run_dir={tmp_path}/run"],
              env=env.get(kind))
    if kind == "kill":
        run.wait_for_step(2)
        os.kill(sorted(workers(run.proc.pid, run.proc.pid))[rank], signal.SIGKILL)
    if kind == "sigterm":
        run.wait_for_step(2)
        run.proc.send_signal(signal.SIGTERM)
    status, expected = {"raise": (1, f"rank {rank} failed in train step 2"),
                        "kill": (1, "without reporting an error"), "sigterm": (143, "interrupted at step")}[kind]
    line = assert_clean_end(run, status, expected)
    if kind == "sigterm":
        assert line.endswith("; no checkpoint written (set checkpoint.dir to save one)"), line
