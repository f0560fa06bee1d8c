"""Two "nodes" on one machine: two Linux network namespaces joined by a veth pair (tests/test_multinode.py).

Each namespace has its own interface (named IFACE in both) and address (10.X.Y.1 and 10.X.Y.2, a /24 picked at random per test
run, with unique namespace and interface names, so two test runs can go side by side). Processes enter a
namespace with `nsenter --net` (not `ip netns exec`, which remounts /sys and hides the cgroup mounts slurmd
needs). Both namespaces share the machine's hostname, which resolves to 127.0.0.1 in each, so torchrun's
c10d rendezvous is told who hosts it (`--rdzv-conf is_host=1/0`) and which address each node has
(`--local-addr`); gloo is pinned to the veth with GLOO_SOCKET_IFNAME.

The fixture `two_nodes` skips, with the reason, where namespaces cannot be made (not root, no `ip` or
`nsenter`, the kernel refusing), and removes both namespaces (which removes the veth pair) in its
finalizer, also when the test failed. Only traffic between the two namespaces the fixture made is sent.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import _LEAKY, _LEAKY_PREFIXES

RDZV_PORT = 29400  # free by construction: the namespaces are new
IFACE = "mwnet0"  # the veth end's name inside each namespace (GLOO_SOCKET_IFNAME)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def unavailable() -> str | None:
    """Why two namespaces cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    missing = [b for b in ("ip", "nsenter") if shutil.which(b) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (iproute2, util-linux)"
    return None


class TwoNodes:
    """Two network namespaces `names[0]`, `names[1]` with veth ends `ifaces[i]` at `addrs[i]`."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 10000:04d}{random.randrange(256):02x}"
        self.names = [f"mw{tag}n0", f"mw{tag}n1"]
        self._tmp_ifaces = [f"mw{tag}v0", f"mw{tag}v1"]  # unique in the host namespace until moved; <= 15 chars
        self.ifaces = [IFACE, IFACE]  # the veth end inside each node
        net = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
        self.addrs = [f"{net}.1", f"{net}.2"]
        self._made: list[str] = []
        self._procs: list[subprocess.Popen] = []

    def start(self) -> TwoNodes:
        for name in self.names:
            _ip("netns", "add", name)
            self._made.append(name)
        _ip("link", "add", self._tmp_ifaces[0], "type", "veth", "peer", "name", self._tmp_ifaces[1])
        for name, tmp, addr in zip(self.names, self._tmp_ifaces, self.addrs):
            _ip("link", "set", tmp, "netns", name)
            _ip("-n", name, "link", "set", tmp, "name", IFACE)  # one name on every node, as on a real cluster
            _ip("-n", name, "addr", "add", f"{addr}/24", "dev", IFACE)
            _ip("-n", name, "link", "set", IFACE, "up")
            _ip("-n", name, "link", "set", "lo", "up")
        probe = (f"import socket; s = socket.socket(); s.settimeout(5); "
                 f"print(s.connect_ex(('{self.addrs[1]}', 9)))")  # refused (111): the link carries packets
        ping = self.run(0, [sys.executable, "-c", probe], timeout=15)
        if ping.stdout.strip() != str(errno.ECONNREFUSED):
            raise RuntimeError(f"veth link does not work: {ping.stdout} {ping.stderr}")
        return self

    def command(self, node: int, args: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.names[node]}", *args]

    def env(self, node: int, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The test's environment without launcher/SLURM variables, gloo pinned to this node's veth."""
        env = {k: v for k, v in os.environ.items() if k not in _LEAKY and not k.startswith(_LEAKY_PREFIXES)}
        env.update({"GLOO_SOCKET_IFNAME": self.ifaces[node], "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                    "OMP_NUM_THREADS": "1"})
        env.update(extra or {})
        return env

    def run(self, node: int, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(node, args), capture_output=True, text=True, timeout=timeout,
                              env=self.env(node), check=False)

    def torchrun(self, node: int, nproc: int, rdzv_id: str, train_args: list[str], log: Path,
                 python: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start torchrun on `node` (its own session: kill_node ends it and its workers), output to `log`;
        `env`: more variables for this node (e.g. a node-local scratch directory)."""
        cmd = [python, "-m", "torch.distributed.run", "--nnodes", str(len(self.names)), "--nproc-per-node", str(nproc),
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{self.addrs[0]}:{RDZV_PORT}", "--rdzv-id", rdzv_id,
               "--rdzv-conf", f"is_host={int(node == 0)}", "--local-addr", self.addrs[node],
               "-m", "meshweave", "train", *train_args]
        with open(log, "wb") as out:
            proc = subprocess.Popen(self.command(node, cmd), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env(node, env), start_new_session=True)
        self._procs.append(proc)
        return proc

    def pids(self, node: int) -> list[int]:
        """Every process in the node's namespace (all started by this test: nothing else enters it)."""
        out = _ip("netns", "pids", self.names[node], check=False).stdout
        return [int(p) for p in out.split() if p.isdigit()]

    def kill_node(self, node: int) -> None:
        """SIGKILL every process of the node (torchrun, and its workers, which torch elastic starts in sessions
        of their own), as if the machine went away."""
        for _ in range(50):  # a process may be forking while we kill: until the namespace is empty
            pids = self.pids(node)
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def cleanup(self) -> None:
        for node, name in enumerate(self.names):  # the processes in our namespaces are ours
            if name in self._made:
                self.kill_node(node)
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for name in self._made:
            _ip("netns", "del", name, check=False)
        for iface in self._tmp_ifaces:  # normally gone with its namespace
            if _ip("link", "show", iface, check=False).returncode == 0:
                _ip("link", "del", iface, check=False)
        self._made.clear()


def wait_all(nodes: TwoNodes, procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    """Exit statuses of each node's launcher; a node still running at the deadline is killed (status None)."""
    end = time.monotonic() + timeout
    codes: list[int | None] = []
    for node, proc in enumerate(procs):
        try:
            codes.append(proc.wait(timeout=max(0.1, end - time.monotonic())))
        except subprocess.TimeoutExpired:
            nodes.kill_node(node)  # a launcher left hung (e.g. after a peer vanished) ignores SIGTERM
            proc.wait(timeout=30)
            codes.append(None)
    return codes


@pytest.fixture
def two_nodes():
    """Two started namespaces; skips (with the reason) where they cannot be made; always removed after."""
    reason = unavailable()
    if reason:
        pytest.skip(f"cannot make two network-namespace nodes here: {reason}")
    nodes = TwoNodes()
    try:
        nodes.start()
    except (subprocess.CalledProcessError, RuntimeError, OSError) as err:
        nodes.cleanup()
        detail = err.stderr.strip() if isinstance(err, subprocess.CalledProcessError) else str(err)
        pytest.skip(f"cannot make two network-namespace nodes here: {detail}")
    try:
        yield nodes
    finally:
        nodes.cleanup()
