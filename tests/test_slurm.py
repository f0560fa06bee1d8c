"""`meshweave train` under a REAL single-host SLURM cluster (tests/slurm_cluster.py): srun, and sbatch + torchrun.

tests/test_launch.py simulates srun's environment; these tests start munged, slurmctld and slurmd and let
SLURM itself start the tasks. They skip, with the reason, where the cluster cannot run (no packages, no
root, slurmd refusing to start on a cgroup2-only machine). Every srun/sbatch is wrapped in `timeout -k`.
"""

import json
import re
import sys
import time

import pytest

from meshweave.launch.env import free_port
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (module-scoped fixture)

pytestmark = pytest.mark.slow  # a real SLURM cluster: minutes

PY = sys.executable
TRAIN = [PY, "-m", "meshweave", "train"]
SHORT = ["--set", "train.steps=4", "--set", "logging.every_steps=2", "--set", "train.seq_len=64",
         "--set", "data.max_bytes=200000"]


def _task_lines(text):
    """srun --label output as {task: [lines]} (lines of srun itself, "srun: ...", are left out)."""
    tasks = {}
    for line in text.splitlines():
        head, sep, rest = line.partition(": ")
        if sep and head.strip().isdigit():
            tasks.setdefault(int(head), []).append(rest)
    return tasks


def _tasks_exited_with(text, status):
    """The tasks srun reports as "task 1: Exited with exit code S" or "tasks 0-1: ..." (one line or several)."""
    tasks = set()
    for spec in re.findall(rf"tasks? ([\d,-]+): Exited with exit code {status}\b", text):
        for part in spec.split(","):
            first, _, last = part.partition("-")
            tasks.update(range(int(first), int(last or first) + 1))
    return tasks


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_srun_two_tasks_train(slurm_cluster, tmp_path, monkeypatch):  # noqa: F811
    """`srun -n 2 python -m meshweave train`: ranks from SLURM_PROCID/NTASKS, progress from rank 0 only."""
    # A launcher's variables in the test process must not reach the tasks (they would win over SLURM's).
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "5")
    proc = slurm_cluster.run(["srun", "-n", "2", "--label", "-t", "3", *TRAIN, "--set", f"run_dir={tmp_path}",
                              *SHORT], timeout=150)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = _task_lines(proc.stdout)
    progress = {task: [line for line in lines if line.startswith("step ")] for task, lines in out.items()}
    assert [line.split()[1] for line in progress.get(0, [])] == ["2/4", "4/4"], proc.stdout[-2000:]
    assert not progress.get(1), "rank 1 printed progress lines"
    assert "Traceback" not in proc.stderr
    for rank in (0, 1):
        records = _records(tmp_path / "metrics" / f"rank{rank}.jsonl")
        assert [r["step"] for r in records] == [2, 4]
        assert all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records)  # finite, positive
    assert not (tmp_path / "metrics" / "rank2.jsonl").exists()  # world size 2, not the test process's 5


def test_srun_bad_layout_is_a_config_error_on_every_task(slurm_cluster, tmp_path):  # noqa: F811
    """dp=3 on 2 tasks: every task exits 2; the node's first task prints the one-line config error (every
    task finds the same, so the others stay quiet); no traceback, nothing trained."""
    proc = slurm_cluster.run(["srun", "-n", "2", "--label", "-t", "2", *TRAIN, "--set", f"run_dir={tmp_path}",
                              "--set", "parallel.dp=3", *SHORT], timeout=90)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = _task_lines(proc.stderr)
    assert sorted(errors) == [0], proc.stderr  # one line per node, from its first task
    assert _tasks_exited_with(proc.stderr, 2) == {0, 1}, proc.stderr  # yet both tasks ended with 2
    for task, lines in errors.items():
        assert len(lines) == 1 and lines[0].startswith("meshweave: config error:"), (task, lines)
        assert "dp" in lines[0] and "2" in lines[0], lines[0]
    assert not _task_lines(proc.stdout)  # no progress, no other output
    assert not (tmp_path / "metrics").exists()


def test_sbatch_srun_torchrun_one_node(slurm_cluster, tmp_path):  # noqa: F811
    """sbatch of a script running `srun torchrun --nproc-per-node 2 --rdzv-backend c10d ...` completes."""
    port = free_port()
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
set -euo pipefail
echo "job $SLURM_JOB_ID on $SLURM_JOB_NODELIST"
srun --ntasks 1 timeout -k 5 150 {PY} -m torch.distributed.run --nnodes 1 --nproc-per-node 2 \\
    --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:{port} \\
    -m meshweave train --set run_dir={tmp_path}/run {' '.join(SHORT)}
""")
    log = tmp_path / "job.out"
    proc = slurm_cluster.run(["sbatch", "--parsable", "-n", "1", "-c", "2", "-t", "4", "-o", str(log), str(script)],
                             timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    # Poll ourselves: `sbatch --wait` sleeps 2, 8, then 32 s between checks (a 10 s job would take 42 s).
    state = slurm_cluster.wait_job(job_id, timeout=180)
    output = log.read_text() if log.exists() else "(no job output)"
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, f"{state}\n{output[-3000:]}"
    assert f"job {job_id} on {slurm_cluster.node}" in output
    progress = [line for line in output.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == ["2/4", "4/4"], output[-3000:]
    for rank in (0, 1):
        assert [r["step"] for r in _records(tmp_path / "run" / "metrics" / f"rank{rank}.jsonl")] == [2, 4]


# -- `meshweave slurm`: the script it writes, submitted to the real cluster ---------------------------------

def _meshweave_slurm(cluster, tmp_path, *extra, steps=4, timeout=60):
    """`meshweave slurm --submit` for 1 node x 2 CPU processes of the built-in config; returns the job id."""
    proc = cluster.run([PY, "-m", "meshweave", "slurm", "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2",
                        "--cpus-per-node", "2", "--time", "5", "--job-name", "mwtest", "--output", str(tmp_path / "logs"),
                        "--python", PY, "--submit", "--set", f"run_dir={tmp_path}/run", *SHORT,
                        "--set", f"train.steps={steps}", *extra], timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.strip()
    assert job_id.isdigit(), proc.stdout
    assert "1 node(s) x 2 = 2 processes: dp=2" in proc.stderr
    return job_id


def _job_state(cluster, job_id):
    info = cluster.run(["scontrol", "show", "job", job_id], timeout=10).stdout
    match = re.search(r"JobState=(\S+)", info)
    return (match.group(1) if match else "?"), info


def test_meshweave_slurm_submit_trains_and_a_requeue_resumes_from_checkpoint(slurm_cluster, tmp_path):  # noqa: F811
    """`meshweave slurm ... --submit`: the sbatch script starts one torchrun (2 workers) through srun, rendezvous
    on the job's first node, and trains. The time-limit warning (SIGUSR1 to the batch shell, as
    `--signal=B:USR1@120` sends it) makes the script stop the ranks with SIGTERM (they save a checkpoint at the
    step they reached) and requeue the job; the requeued job runs the script again and `meshweave train` resumes
    from that checkpoint to the end; the job completes with exit code 0. (One job for both: a submitted job that
    only trained to the end started the same processes and proved a subset of this, at a minute of the suite.)"""
    job_id = _meshweave_slurm(slurm_cluster, tmp_path, "--set", f"checkpoint.dir={tmp_path}/ckpt",
                              "--set", "checkpoint.every_steps=100", steps=40)
    log = tmp_path / "logs" / f"mwtest-{job_id}.out"
    end = time.monotonic() + 150
    while not (log.exists() and re.search(r"^step (6|8|10)/40", log.read_text(), re.MULTILINE)):
        assert time.monotonic() < end, f"no step 6-10 within 150 s:\n{log.read_text() if log.exists() else ''}"
        assert _job_state(slurm_cluster, job_id)[0] in ("PENDING", "CONFIGURING", "RUNNING"), log.read_text()
        time.sleep(0.3)
    sent = slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job_id], timeout=10)
    assert sent.returncode == 0, sent.stderr
    end = time.monotonic() + 240
    while True:
        state, info = _job_state(slurm_cluster, job_id)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        if state == "PENDING" and "Reason=BeginTime" in info:  # a requeued job waits out a begin delay
            slurm_cluster.run(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], timeout=10)
        assert time.monotonic() < end, f"job still {state} after 240 s:\n{info}\n{log.read_text()[-3000:]}"
        time.sleep(0.5)
    output = log.read_text()
    assert state == "COMPLETED" and "Restarts=1" in info, f"{info}\n{output[-4000:]}"
    assert "ExitCode=0:0" in info, f"{info}\n{output[-4000:]}"
    port = 20000 + int(job_id) % 20000
    assert f"meshweave: job {job_id} (restart 0) on {slurm_cluster.node}, rendezvous {slurm_cluster.node}:{port}" \
        in output, output[-3000:]
    assert f"meshweave: job {job_id} near its time limit or preempted: saving and requeueing" in output
    assert f"meshweave: job {job_id} (restart 1)" in output, output[-4000:]
    saved = re.findall(r"resumed from checkpoint at step (\d+)", output)
    assert len(saved) == 1 and 6 <= int(saved[0]) < 40, output[-4000:]
    first, second = output.split(f"meshweave: job {job_id} (restart 1)")
    assert not re.search(r"^step 40/40", first, re.MULTILINE)  # stopped early, then finished in the requeued run
    assert re.search(r"^step 40/40", second, re.MULTILINE), second[-3000:]
    progress = [line.split()[1] for line in first.splitlines() if line.startswith("step ")]
    assert progress == [f"{s}/40" for s in range(2, 2 * len(progress) + 1, 2)] and len(progress) >= 3, first[-3000:]
    for rank in (0, 1):
        records = _records(tmp_path / "run" / "metrics" / f"rank{rank}.jsonl")
        assert records[-1]["step"] == 40 and all(r["loss"] == r["loss"] and r["loss"] > 0 for r in records)
    steps = [r["step"] for r in _records(tmp_path / "run" / "metrics" / "rank0.jsonl")]
    assert steps[-1] == 40 and steps == sorted(steps)  # the requeued run continued after the saved step
