"""A throw-away single-host SLURM cluster for the test suite: munged, slurmctld and slurmd on this machine.

Everything (munge key and socket, slurm.conf, state, spool, logs, pid files) lives in one temporary
directory, so nothing in /etc or /var is touched and several clusters can run side by side. The node
advertises more CPUs than the machine has (``SlurmdParameters=config_overrides``) so that ``srun -n 2``
and ``sbatch -c 2`` fit on a 2-core machine, and ``EnforcePartLimits=ALL`` makes an impossible request
fail at once instead of waiting in the queue. No systemd or cgroup plugin is used
(proctrack/linuxproc, task/none), but slurmd 22.05 still needs cgroup mounts: where a daemon does not
come up (e.g. a cgroup2-only machine) the ``slurm_cluster`` fixture skips with the daemon's own words.

Usage: the module-scoped fixture ``slurm_cluster`` yields a started :class:`SlurmCluster`; run client
commands with :meth:`SlurmCluster.run`, which wraps each one in ``timeout -k`` and passes a clean
environment (no RANK/WORLD_SIZE/MASTER_* or SLURM_* from the test process).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from meshweave.launch.env import free_port

DAEMONS = ("munged", "munge", "unmunge", "slurmctld", "slurmd")
CLIENTS = ("srun", "sbatch", "sinfo", "squeue", "scancel", "scontrol")
START_TIMEOUT = 30.0  # seconds for the whole cluster to report an idle node

# Launcher variables of the test process that must not leak into the tasks (they would make a task
# believe it runs under torchrun, or talk to another job's rendezvous), plus any outer SLURM job's.
_LEAKY = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
          "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MESHWEAVE_FAULT")
_LEAKY_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "TORCHELASTIC_", "TORCH_ELASTIC_")


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run on this machine (missing binaries, not root, a daemon that does not start)."""


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _first_job_id() -> int:
    """meshweave derives MASTER_PORT = 20000 + SLURM_JOB_ID % 20000 under srun: start the job ids at a random
    point whose ports (for the first few jobs) are free now, so that two clusters running side by side (two
    test runs at once) or a busy port do not make a job's rendezvous collide."""
    for _ in range(200):
        job = random.randrange(1000, 19000)
        if all(_port_free(20000 + job + i) for i in range(4)):
            return job
    return random.randrange(1000, 19000)


def _which(name: str) -> str | None:
    """shutil.which, also looking in the sbin directories (daemons live there; not always on PATH)."""
    extra = os.pathsep.join(("/usr/local/sbin", "/usr/sbin", "/sbin"))
    return shutil.which(name) or shutil.which(name, path=extra)


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS + CLIENTS + ("timeout",) if _which(name) is None]


def _cgroup_hint() -> str:
    v1 = Path("/proc/mounts").read_text().count(" cgroup ") if Path("/proc/mounts").exists() else 0
    if v1 == 0 and Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return " (this machine has only cgroup v2 mounted; slurmd 22.05 needs cgroup v1 mounts here)"
    return ""


class SlurmCluster:
    """One controller and one node (the machine's own hostname, at 127.0.0.1) in a temporary directory."""

    def __init__(self, root: str | Path | None = None, cpus: int = 8):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="mwslurm-"))  # short: socket path limit
        self.cpus = cpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.logs = self.root / "log"
        self._procs: dict[str, subprocess.Popen] = {}
        self._timeout = START_TIMEOUT

    # -- environment and client commands -------------------------------------------------------------

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The test process's environment without launcher/SLURM variables, pointed at this cluster."""
        env = {k: v for k, v in os.environ.items() if k not in _LEAKY and not k.startswith(_LEAKY_PREFIXES)}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra or {})
        return env

    def run(self, args: list[str], timeout: float = 60,
            extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a client command (srun, sbatch, ...) under `timeout -k 5 TIMEOUT`; never waits longer."""
        cmd = ["timeout", "-k", "5", str(int(timeout)), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env(extra_env), timeout=timeout + 15)

    def wait_job(self, job_id: str, timeout: float = 120, poll: float = 0.5) -> str:
        """Wait until a batch job has ended; returns `scontrol show job` (the job is cancelled on timeout)."""
        end = time.monotonic() + timeout
        while True:
            info = self.run(["scontrol", "show", "job", job_id], timeout=10).stdout
            match = re.search(r"JobState=(\S+)", info)
            if match and match.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"):
                return info
            if time.monotonic() > end:
                self.run(["scancel", job_id], timeout=10)
                return f"timed out after {timeout:.0f} s waiting for job {job_id} (cancelled):\n{info}"
            time.sleep(poll)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logs / f"{name}.log"
        out = self.logs / f"{name}.out"
        text = "".join(p.read_text(errors="replace") for p in (path, out) if p.exists())
        return "\n".join(text.strip().splitlines()[-lines:])

    # -- start / stop ----------------------------------------------------------------------------------

    def _write_files(self) -> None:
        for sub in ("munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o755)  # munged refuses a socket directory writable by others
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        (self.root / "plugstack.conf").write_text("")  # no site SPANK plugins
        first_job = _first_job_id()
        r = self.root
        self.conf.write_text(f"""\
ClusterName=meshweave-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={r}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
EnforcePartLimits=ALL
SchedulerType=sched/builtin
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
FirstJobId={first_job}
KillWait=2
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=10 State=UP
""")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.logs / f"{name}.out", "wb")
        try:
            self._procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                 env=self.env(), start_new_session=True)
        finally:
            out.close()

    def _alive(self, name: str) -> None:
        proc = self._procs[name]
        if proc.poll() is not None:
            raise ClusterUnavailable(f"{name} exited with status {proc.returncode}{_cgroup_hint()}:\n"
                                     f"{self.log_tail(name)}")

    def start(self, timeout: float = START_TIMEOUT) -> "SlurmCluster":
        if missing_binaries():
            raise ClusterUnavailable(f"SLURM/munge binaries not installed: {', '.join(missing_binaries())} "
                                     "(apt-get install slurmctld slurmd slurm-client munge)")
        if os.geteuid() != 0:
            raise ClusterUnavailable("starting slurmd needs root")
        self._timeout = timeout
        deadline = time.monotonic() + timeout
        self._write_files()
        m = self.root / "munge"
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--seed-file={m / 'munged.seed'}", f"--log-file={self.logs / 'munged.log'}"])
        self._wait(deadline, "munged", self._munge_works)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._wait(deadline, "slurmctld", lambda: self.run(["scontrol", "ping"], timeout=5).stdout.count("UP") > 0)
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(deadline, "slurmd", self._node_idle)
        return self

    def _munge_works(self) -> bool:
        if not self.munge_socket.exists():
            return False
        cred = subprocess.run([_which("munge"), "-n", "-S", str(self.munge_socket)], capture_output=True, timeout=5)
        check = subprocess.run([_which("unmunge"), "-S", str(self.munge_socket)], input=cred.stdout, capture_output=True,
                               timeout=5)
        return cred.returncode == 0 and check.returncode == 0

    def _node_idle(self) -> bool:
        state = self.run(["sinfo", "-h", "-N", "-o", "%T"], timeout=5).stdout.split()
        return state == ["idle"]

    def _wait(self, deadline: float, name: str, ready) -> None:
        while True:
            self._alive(name)
            try:
                if ready():
                    return
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"{name} did not come up within {self._timeout:.0f} s{_cgroup_hint()}:\n"
                                         f"{self.log_tail(name)}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel what is still queued or running, then stop slurmd, slurmctld and munged (ours, by pid)."""
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            try:
                self.run(["scancel", "--full", "--user", "root"], timeout=10)
                end = time.monotonic() + 10
                while time.monotonic() < end and self.run(["squeue", "-h"], timeout=5).stdout.strip():
                    time.sleep(0.2)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_cluster():
    """A started single-host cluster for the module; skips (with the reason) where it cannot run."""
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM/munge binaries not installed ({', '.join(missing)}); .ci/run installs them with apt-get")
    cluster = SlurmCluster()
    try:
        cluster.start()
    except ClusterUnavailable as err:
        cluster.cleanup()
        pytest.skip(f"cannot run a SLURM cluster here: {err}")
    except BaseException:
        cluster.cleanup()
        raise
    try:
        yield cluster
    finally:
        cluster.cleanup()
