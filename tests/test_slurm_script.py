"""`meshweave slurm`: the sbatch script's text (against golden files) and the requests it refuses (in-process).

Submitting the script to a real SLURM cluster is tests/test_slurm.py (slow). Set MESHWEAVE_UPDATE_GOLDEN=1
to rewrite the golden files after an intended change of the script (then read the diff).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshweave.launch.cli import main

GOLDEN = Path(__file__).parent / "golden"
# Fixed interpreter and relative paths: the text must not depend on this checkout or this machine.
GPU_ARGS = ["configs/dp2_tp2_pp2.yaml", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu", "--time",
            "4:00:00", "--account", "proj42", "--job-name", "llama-pre", "--output", "logs", "--python", "python3",
            "--set", "checkpoint.dir=/shared/ckpt/llama-pre", "--set", "checkpoint.every_steps=50",
            "--set", "train.steps=1000"]
CPU_ARGS = ["--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2", "--cpus-per-node", "2",
            "--python", "/opt/venv/bin/python", "--ifname", "eth0", "--port", "29400", "--max-restarts", "2",
            "--set", "run_dir=runs/a dir with spaces", "--set", "train.steps=4"]


def _slurm(args, capfd):
    code = main(["slurm", *args])
    out, err = capfd.readouterr()
    return code, out, [line for line in err.splitlines() if line]


def _golden(name, text):
    path = GOLDEN / name
    if os.environ.get("MESHWEAVE_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"script differs from {path} (MESHWEAVE_UPDATE_GOLDEN=1 rewrites it)"


@pytest.fixture(autouse=True)
def _in_tmp(monkeypatch, tmp_path):
    """Run in a fresh directory with configs/ linked in: the golden files hold relative paths, and --output
    creates its directory."""
    (tmp_path / "configs").symlink_to(Path(__file__).parent.parent / "configs")
    monkeypatch.chdir(tmp_path)


@pytest.mark.parametrize("name,args", [("slurm_gpu_2x4.sbatch", GPU_ARGS), ("slurm_cpu_1x2.sbatch", CPU_ARGS)])
def test_script_matches_golden(name, args, capfd, tmp_path):
    code, out, err = _slurm(args, capfd)
    assert code == 0, err
    _golden(name, out)
    assert err[0].startswith("meshweave: ") and "processes: dp=" in err[0]
    assert (tmp_path / "logs").is_dir() == ("--output" in args)  # created here: SLURM does not create it


def test_gpu_script_content(capfd):
    code, out, _ = _slurm(GPU_ARGS, capfd)
    assert code == 0
    lines = out.splitlines()
    for opt in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4", "--requeue", "--signal=B:USR1@120",
                "--partition=gpu", "--time=4:00:00", "--account=proj42", "--job-name=llama-pre"):
        assert f"#SBATCH {opt}" in lines, opt
    assert 'head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"' in lines
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in lines
    assert any(line.startswith("trap requeue USR1") for line in lines)
    assert "--nproc-per-node 4" in out and '--rdzv-endpoint "$head_node:$port"' in out
    assert "-m meshweave train configs/dp2_tp2_pp2.yaml" in out and "--set checkpoint.dir=/shared/ckpt/llama-pre" in out
    assert "2 node(s) x 4 = 8 processes: dp=2 tp=2 pp=2 sp=1" in lines[1]


def test_node_local_checkpoints_without_a_persistent_level_get_a_note(capfd):
    code, out, err = _slurm([*CPU_ARGS, "--set", "checkpoint.dir=$SLURM_TMPDIR/ckpt", "--set", "checkpoint.node_local=true"], capfd)
    assert code == 0 and "'checkpoint.dir=$SLURM_TMPDIR/ckpt'" in out  # quoted: each node's process expands it
    assert any("node_local without a persistent level" in line and "persistent_dir" in line for line in err), err


def test_script_is_valid_bash_and_written_to_file(capfd, tmp_path):
    path = tmp_path / "job.sbatch"
    code, out, err = _slurm([*CPU_ARGS, "--out", str(path)], capfd)
    assert code == 0 and out == "" and err[-1] == f"meshweave: wrote {path}"
    assert os.access(path, os.X_OK)
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
    # The --set value with spaces reaches `meshweave train` as one argument.
    assert "--set 'run_dir=runs/a dir with spaces'" in path.read_text()


@pytest.mark.parametrize("args,words", [
    (["--nodes", "0", "--gpus-per-node", "8"], ["--nodes: 0 must be >= 1"]),
    (["--nodes", "-2", "--gpus-per-node", "8"], ["--nodes: -2"]),
    # a fixed layout using fewer (or more) processes than asked for
    (["--nodes", "4", "--gpus-per-node", "8", "--set", "parallel.dp=2", "--set", "parallel.tp=8"],
     ["dp*tp*pp*sp = 2*8*1*1 = 16", "= 32", "ask for 2 node(s)"]),
    (["--nodes", "2", "--gpus-per-node", "4", "--set", "parallel.dp=1"], ["= 1 processes", "= 8"]),
    # degrees whose product does not divide nodes x gpus
    (["--nodes", "3", "--gpus-per-node", "2", "--set", "parallel.tp=2", "--set", "parallel.pp=2"],
     ["tp*pp*sp = 2*2*1 = 4 does not divide", "= 6"]),
    (["--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "3", "--set", "parallel.sp=2"], ["does not divide"]),
    # tensor parallel across nodes
    (["--nodes", "4", "--gpus-per-node", "2", "--set", "parallel.tp=4"], ["parallel.tp: 4 is larger than the 2"]),
    (["--nodes", "2", "--gpus-per-node", "6", "--set", "parallel.tp=4", "--set", "parallel.dp=3"],
     ["parallel.tp: 4 does not divide the 6"]),
    # the config's own rules, as `meshweave train` runs them, for the world size asked for
    (["--nodes", "3", "--gpus-per-node", "1"], ["train.global_batch: 8 is not divisible by the data-parallel degree 3"]),
    (["--nodes", "1", "--gpus-per-node", "0"], ["--nproc-per-node"]),
    (["--nodes", "1", "--gpus-per-node", "2", "--nproc-per-node", "4"], ["--nproc-per-node: 4 differs"]),
    (["--nodes", "1", "--gpus-per-node", "-1"], ["--gpus-per-node: -1"]),
    (["--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2", "--set", "train.device=cuda"],
     ["train.device: cuda"]),
    (["--nodes", "1", "--gpus-per-node", "2", "--partition", "a b"], ["--partition"]),
    (["--nodes", "1", "--gpus-per-node", "2", "--set", "parallel.bogus=1"], ["parallel.bogus"]),
])
def test_bad_request_is_one_line_exit_2(args, words, capfd, tmp_path):
    out_file = tmp_path / "job.sbatch"
    code, out, err = _slurm([*args, "--out", str(out_file), "--submit"], capfd)
    assert code == 2 and out == "", (code, out, err)
    assert len(err) == 1 and err[0].startswith("meshweave: config error: "), err
    for word in words:
        assert word in err[0], (word, err[0])
    assert not out_file.exists()  # nothing written, nothing submitted


def test_gpu_count_of_a_cuda_config_is_not_checked_on_the_submit_host(capfd):
    """device: cuda is checked against --gpus-per-node, not against this (GPU-less) machine."""
    code, out, err = _slurm(["--nodes", "2", "--gpus-per-node", "2", "--set", "train.device=cuda"], capfd)
    assert code == 0, err
    assert "--set train.device=cuda" in out


def test_submit_without_sbatch_is_one_line(capfd, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    code, out, err = _slurm(["--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2", "--submit"], capfd)
    assert code == 3 and out == ""
    assert err[-1].startswith("meshweave: submit error: sbatch is not on PATH")


def test_submit_prints_the_job_id(capfd, monkeypatch, tmp_path):
    """--submit hands the script to `sbatch --parsable` on stdin and prints only the job id on stdout."""
    fake = tmp_path / "sbatch"
    fake.write_text(f"#!/bin/bash\necho \"$@\" > {tmp_path}/args\ncat > {tmp_path}/script\necho '4242;cluster'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    code, out, err = _slurm(["--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2", "--submit"], capfd)
    assert code == 0 and out == "4242\n", err
    assert (tmp_path / "args").read_text().split() == ["--parsable"]
    assert (tmp_path / "script").read_text().startswith("#!/bin/bash\n# Written by `meshweave slurm`")


def test_cli_imports_no_torch():
    code = ("import sys; from meshweave.launch.cli import main; "
            "main(['slurm', '--nodes', '2', '--gpus-per-node', '8', '--out', '/dev/null']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
