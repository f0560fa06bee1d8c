"""Shared by the failure drills (tests/test_failures*.py): `meshweave train` in its own session, and the checks
that a failure ended cleanly: the exit status, one stderr line (no traceback), no process of the session left,
nothing left in TMPDIR, and a run directory either absent or complete."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

TINY = ["--set", "model.dim=32", "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set", "model.n_kv_heads=1",
        "--set", "model.ffn_hidden=32", "--set", "train.seq_len=16", "--set", "train.global_batch=2",
        "--set", "train.steps=2", "--set", "data.max_bytes=20000"]
LONG = ["--set", "train.steps=100000", "--set", "logging.every_steps=1"]  # runs until interrupted
DRILL_LINES = ("meshweave: injected crash",)  # train/faults.py announces its own kill on stderr


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def workers(sid: int, launcher: int) -> list[int]:
    pids = []
    for pid in session_members(sid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if pid != launcher and "spawn_main" in cmd and "resource_tracker" not in cmd:
            pids.append(pid)
    return pids


class Run:
    """`meshweave train ...` (or another command) in its own session, stdout read as it comes."""

    def __init__(self, tmp_path: Path, args: list[str], env: dict[str, str] | None = None,
                 module: list[str] | None = None) -> None:
        self.tmpdir = tmp_path / "tmp"
        self.tmpdir.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", *(module or ["meshweave", "train"]), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True,
                                     env={**os.environ, "TMPDIR": str(self.tmpdir), **(env or {})})
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=lambda: self.out.extend(self.proc.stdout), daemon=True),
                        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)]
        for reader in self.readers:
            reader.start()

    def wait_for_step(self, step: int, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line.startswith("step") and int(line.split("/")[0].split()[-1]) >= step for line in list(self.out)):
                return
            assert self.proc.poll() is None, f"ended early: {self.err}"
            time.sleep(0.1)
        raise AssertionError("no progress line")

    def finish(self, timeout: float = 300) -> tuple[int, list[str]]:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
        for reader in self.readers:
            reader.join(5)
        lines = [line.rstrip("\n") for line in self.err]
        return self.proc.returncode, [line for line in lines if line and not line.startswith(DRILL_LINES)]


def wait_until_catching(pid: int, signum: int, timeout: float = 60.0) -> None:
    """Until the process has a handler for `signum` (its SigCgt mask in /proc): a signal sent earlier, while a
    loaded machine is still starting the interpreter, would end it with the default action instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        if caught & (1 << (signum - 1)):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} installed no handler for signal {signum} within {timeout:g} s")


def assert_clean_end(run: Run, status: int, expected: str, tmp_empty: bool = True) -> str:
    """The exit status, one stderr line containing `expected`, no process left, nothing left in TMPDIR."""
    code, lines = run.finish()
    assert code == status, lines
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert expected in lines[0], lines
    deadline = time.monotonic() + 10
    while session_members(run.proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_members(run.proc.pid) == [], "processes left behind"
    if tmp_empty:  # torch's compile cache (torchinductor_<user>) is meant to persist; nothing else may
        assert sorted(p.name for p in run.tmpdir.iterdir() if not p.name.startswith("torchinductor_")) == []
    return lines[0]


def assert_no_run_dir(run_dir: Path) -> None:
    assert not run_dir.exists(), sorted(str(p) for p in run_dir.rglob("*"))


def assert_failed_run_dir(run_dir: Path, rank: int) -> None:
    assert (run_dir / "config.yaml").read_text().startswith("version: 1")
    log = (run_dir / "logs" / f"rank{rank}.log").read_text()
    assert log.startswith(f"=== rank {rank} failed in ") and "Traceback (most recent call last)" in log



def children() -> list[int]:
    """This process's child processes."""
    return sorted(int(pid) for pid in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split())


def main_in_process(args: list[str], capfd) -> tuple[int, list[str]]:
    """`meshweave train ARGS` through its own entry point in this process (for failures found before any worker
    starts): the exit status and the non-empty stderr lines; asserts that no child process was started."""
    from meshweave.launch.cli import main

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    before = children()
    try:
        code = main(["train", *args])
    finally:
        for sig, handler in handlers.items():  # train installs its own start-up handlers
            signal.signal(sig, handler)
    assert children() == before
    return code, [line for line in capfd.readouterr().err.splitlines() if line]
