"""`srun -N2` and `meshweave slurm --nodes 2` on a real two-node SLURM cluster: one slurmd in each of the two
network namespaces of tests/netns_support.py (nodes node0 and node1 at the veth addresses), slurmctld and the
client commands in node 0's namespace, munged on the machine (its socket is a path, reachable from both).
Skipped, with the reason, where namespaces or the SLURM daemons cannot run here.
"""

import json
import re
import shlex
import sys

import pytest

from tests.netns_support import TwoNodes, unavailable
from tests.slurm_cluster import ClusterUnavailable, SlurmCluster, missing_binaries

pytestmark = pytest.mark.slow

PY = sys.executable
SMALL = ["--set", "model.dim=64", "--set", "model.n_layers=2", "--set", "model.n_heads=4", "--set", "model.n_kv_heads=2",
         "--set", "model.ffn_hidden=96", "--set", "data.max_bytes=100000", "--set", "train.seq_len=64",
         "--set", "train.steps=4", "--set", "logging.every_steps=2"]


class TwoNodeSlurmCluster(SlurmCluster):
    """slurmctld and node0's slurmd in namespace 0, node1's slurmd in namespace 1. Each slurmd (and so each job
    step) also gets the node's hostname and a hosts file naming both nodes, as on a real cluster: torchrun's c10d
    rendezvous finds its host by comparing the endpoint's name with the machine's hostname."""

    def __init__(self, nodes: TwoNodes, cpus: int = 8):
        super().__init__(cpus=cpus)
        self.nodes = nodes
        self.node_names = ["node0", "node1"]

    def _write_files(self) -> None:
        super()._write_files()
        a0, a1 = self.nodes.addrs
        text = self.conf.read_text()
        text = text.replace(f"SlurmctldHost={self.node}(127.0.0.1)", f"SlurmctldHost={self.node}({a0})")
        text = re.sub(r"^SlurmdSpoolDir=(.*)$", r"SlurmdSpoolDir=\1/%n", text, flags=re.MULTILINE)
        text = re.sub(r"^SlurmdPidFile=(.*)slurmd.pid$", r"SlurmdPidFile=\1slurmd-%n.pid", text, flags=re.MULTILINE)
        text = re.sub(r"^SlurmdLogFile=(.*)slurmd.log$", r"SlurmdLogFile=\1slurmd-%n.log", text, flags=re.MULTILINE)
        text = re.sub(r"^NodeName=.*$", f"NodeName=node0 NodeAddr={a0} CPUs={self.cpus} State=UNKNOWN\n"
                      f"NodeName=node1 NodeAddr={a1} CPUs={self.cpus} State=UNKNOWN", text, flags=re.MULTILINE)
        text = re.sub(r"^PartitionName=debug Nodes=\S+", "PartitionName=debug Nodes=node0,node1", text, flags=re.MULTILINE)
        self.conf.write_text(text)
        for name in self.node_names:
            (self.root / "spool" / name).mkdir(parents=True, exist_ok=True)

    def _spawn(self, name, cmd):
        if name == "slurmctld":
            cmd = self.nodes.command(0, cmd)
        elif name == "slurmd":  # one per namespace, with the node's own hostname and hosts file (UTS and mounts)
            hosts = self.root / "hosts"
            hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(self.nodes.addrs,
                                                                                          self.node_names)))
            for i, node in enumerate(self.node_names):
                inner = f"hostname {node} && mount --bind {hosts} /etc/hosts && exec {shlex.join([*cmd, '-N', node])}"
                super()._spawn(f"slurmd-{node}", self.nodes.command(i, ["unshare", "--uts", "--mount",
                                                                        "--propagation", "private", "sh", "-c", inner]))
            self._procs["slurmd"] = self._procs["slurmd-node0"]
            return
        super()._spawn(name, cmd)

    def _alive(self, name):
        for sub in ([f"slurmd-{n}" for n in self.node_names] if name == "slurmd" else [name]):
            super()._alive(sub)

    def run(self, args, timeout=60, extra_env=None):
        import subprocess

        cmd = self.nodes.command(0, ["timeout", "-k", "5", str(int(timeout)), *args])
        return subprocess.run(cmd, capture_output=True, text=True, env=self.env(extra_env), timeout=timeout + 15,
                              check=False)

    def _node_idle(self):
        return self.run(["sinfo", "-h", "-N", "-o", "%T"], timeout=5).stdout.split() == ["idle", "idle"]

    def stop(self):
        super().stop()
        for name in list(self._procs):
            proc = self._procs.pop(name)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def two_node_cluster():
    reason = unavailable()
    if reason:
        pytest.skip(f"cannot make two network-namespace nodes here: {reason}")
    if missing_binaries():
        pytest.skip(f"SLURM/munge binaries not installed ({', '.join(missing_binaries())})")
    nodes = TwoNodes()
    cluster = None
    try:
        nodes.start()
        cluster = TwoNodeSlurmCluster(nodes)
        cluster.start(timeout=60)
    except ClusterUnavailable as err:
        if cluster:
            cluster.cleanup()
        nodes.cleanup()
        pytest.skip(f"cannot run a two-node SLURM cluster here: {err}")
    except BaseException:
        if cluster:
            cluster.cleanup()
        nodes.cleanup()
        raise
    try:
        yield cluster
    finally:
        cluster.cleanup()
        nodes.cleanup()


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_srun_two_nodes_train(two_node_cluster, tmp_path):
    """`srun -N2 -n4` starts two tasks in each namespace; they train together (ranks from SLURM, MASTER_ADDR the
    first node's address, gloo over the veth)."""
    c = two_node_cluster
    proc = c.run(["srun", "-N", "2", "--ntasks-per-node", "2", "--label", "-t", "4",
                  f"--export=ALL,MASTER_ADDR={c.nodes.addrs[0]},GLOO_SOCKET_IFNAME={c.nodes.ifaces[0]},OMP_NUM_THREADS=1",
                  PY, "-m", "meshweave", "train", "--set", f"run_dir={tmp_path}", *SMALL], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(4):
        assert [r["step"] for r in _records(tmp_path / "metrics" / f"rank{rank}.jsonl")] == [2, 4]


def test_meshweave_slurm_two_nodes(two_node_cluster, tmp_path):
    """`meshweave slurm --nodes 2 --submit`: one torchrun per node through `srun --ntasks-per-node=1`, c10d
    rendezvous on node0, 2 x 2 processes; the job completes."""
    c = two_node_cluster
    proc = c.run([PY, "-m", "meshweave", "slurm", "--nodes", "2", "--gpus-per-node", "0", "--nproc-per-node", "2",
                  "--cpus-per-node", "2", "--time", "5", "--job-name", "mw2", "--output", str(tmp_path / "logs"),
                  "--python", PY, "--ifname", c.nodes.ifaces[0], "--submit", "--set", f"run_dir={tmp_path}/run",
                  *SMALL], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = proc.stdout.strip()
    state = c.wait_job(job_id, timeout=240)
    log = tmp_path / "logs" / f"mw2-{job_id}.out"
    output = log.read_text() if log.exists() else "(no job output)"
    assert "JobState=COMPLETED" in state and "NodeList=node[0-1]" in state, f"{state}\n{output[-3000:]}"
    assert "on node[0-1], rendezvous node0:" in output, output[-3000:]
    for rank in range(4):
        assert [r["step"] for r in _records(tmp_path / "run" / "metrics" / f"rank{rank}.jsonl")] == [2, 4]
