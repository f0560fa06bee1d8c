"""Launching: the embedded default (standalone, elastic launcher), torchrun, and SLURM-style environments."""

import json
import os
import subprocess
import sys

import pytest

from meshweave.launch.env import detect, expand_nodelist, free_port, slurm_to_torch_env

SHORT = ["--set", "train.steps=6", "--set", "logging.every_steps=3", "--set", "train.warmup_steps=2",
         "--set", "data.max_bytes=300000", "--set", "train.seq_len=64"]


# A small model where the test is about launching, not about the default model.
SMALL_MODEL = ["--set", "model.dim=64", "--set", "model.n_layers=2", "--set", "model.n_heads=4",
               "--set", "model.n_kv_heads=2", "--set", "model.ffn_hidden=96", "--set", "data.max_bytes=100000"]


def _run(cmd, env=None, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _progress_lines(text):
    return [line for line in text.splitlines() if line.startswith("step ")]


def test_expand_slurm_nodelist():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("node7") == ["node7"]


def test_detect_launch_environment():
    assert detect({}).kind == "standalone"
    assert detect({"RANK": "0", "WORLD_SIZE": "4"}) == detect({"RANK": "3", "WORLD_SIZE": "4", "SLURM_PROCID": "1",
                                                                 "SLURM_NTASKS": "2"})  # torchrun under srun wins
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODELIST": "n[3-4]",
             "SLURM_JOB_ID": "1234"}
    assert detect(slurm).world_size == 8
    env = slurm_to_torch_env(slurm)
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["LOCAL_RANK"] == "1"
    assert env["MASTER_ADDR"] == "n3" and env["MASTER_PORT"] == str(20000 + 1234)


@pytest.mark.slow
def test_embedded_default_run_completes(tmp_path):
    """`meshweave train` with no config: built-in model and corpus, 2 local processes (steps shortened)."""
    proc = _run([sys.executable, "-m", "meshweave", "train", "--set", f"run_dir={tmp_path}", *SHORT])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = _progress_lines(proc.stdout)
    assert [line.split()[1] for line in lines] == ["3/6", "6/6"]  # one line per log step, from rank 0 only
    assert "MFU n/a" in lines[0] and "tok/s" in lines[0] and "eta" in lines[0]
    for rank in (0, 1):
        records = [json.loads(x) for x in (tmp_path / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [3, 6] and records[-1]["loss"] < records[0]["loss"] + 1.0
    assert (tmp_path / "config.yaml").read_text().startswith("version: 1")




@pytest.mark.slow
def test_torchrun_launch_matches_standalone(tmp_path):
    cfg = tmp_path / "dp2.yaml"
    cfg.write_text("version: 1\nparallel: {dp: 2, dp_mode: ddp}\n")
    port = free_port()
    torchrun = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                     str(port), "-m", "meshweave", "train", str(cfg), "--set", f"run_dir={tmp_path}/a", *SHORT, *SMALL_MODEL])
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    standalone = _run([sys.executable, "-m", "meshweave", "train", str(cfg), "--nproc", "2",
                       "--set", f"run_dir={tmp_path}/b", *SHORT, *SMALL_MODEL])
    assert standalone.returncode == 0, standalone.stderr[-3000:]
    loss = lambda out: [line.split("|")[1] for line in _progress_lines(out)]  # noqa: E731
    assert loss(torchrun.stdout) == loss(standalone.stdout) and len(loss(torchrun.stdout)) == 2


@pytest.mark.slow
def test_slurm_environment_launch(tmp_path):
    """What srun gives each task (SLURM_PROCID/NTASKS/LOCALID/NODELIST): two tasks form one job."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "SLURM_NODELIST": "127.0.0.1", "SLURM_JOB_ID": "7", "MASTER_PORT": port}
        env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}, **env}
        procs.append(subprocess.Popen([sys.executable, "-m", "meshweave", "train", "--set", f"run_dir={tmp_path}",
                                       *SHORT, *SMALL_MODEL], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert len(_progress_lines(outs[0][0])) == 2 and _progress_lines(outs[1][0]) == []


@pytest.mark.parametrize("world_env,expected", [
    ({"RANK": "0", "WORLD_SIZE": "3"}, "train.global_batch: 8 is not divisible by the data-parallel degree 3"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "6"}, "data-parallel degree 6"),
])
def test_launcher_world_size_checked_before_any_process_group(world_env, expected):
    """The launcher's world size is validated before init_process_group (which would wait for peers)."""
    proc = _run([sys.executable, "-m", "meshweave", "train"], env=world_env, timeout=60)
    assert proc.returncode == 2
    assert expected in proc.stderr
