"""Multi-node training across two "nodes": two network namespaces joined by a veth pair (tests/netns_support.py).

`meshweave train` under torchrun on each node (2 nodes x 2 processes, c10d rendezvous on node 0, gloo over
the veth) must give the losses of 4 local processes, exactly, through two node failures: each node keeps
its node-local checkpoint copies in a scratch directory of its own (`$NODE_SCRATCH`, as `$SLURM_TMPDIR` on
a cluster) and the persistent level is shared. Node 1 is killed (its torchrun and workers, SIGKILL); the
restart on the same nodes resumes from the node-local copies; node 1 is killed again and comes back with an
empty disk (a replacement node), and the run resumes from the persistent level. Skipped, with the reason,
where namespaces cannot be made.
"""

import json
import re
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from tests.netns_support import two_nodes, wait_all  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow  # four 4-process runs: two or three minutes

PY = sys.executable
STEPS = 24  # long enough that a node can be killed mid-run twice (steps take ~0.2 s)
# A small model and short sequences: the test is about where the processes run, not about the model.
CONFIG = ["--set", "model.dim=64", "--set", "model.n_layers=2", "--set", "model.n_heads=4", "--set", "model.n_kv_heads=2",
          "--set", "model.ffn_hidden=96", "--set", "data.max_bytes=100000", "--set", "train.seq_len=64",
          "--set", f"train.steps={STEPS}", "--set", "train.warmup_steps=3", "--set", "logging.every_steps=1"]
# dp 2 x tp 2: tensor-parallel peers share a node (torchrun gives a node consecutive global ranks), data
# parallelism crosses the veth. (dp 4, all four ranks in one group, also passed: kept out of the suite for time.)
LAYOUT = ["--set", "parallel.tp=2"]


def _losses(run_dir):
    """{step: loss} from rank 0's metrics file."""
    lines = (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same config on 4 local processes (`meshweave train --nproc 4`): {step: loss}."""
    run_dir = tmp_path_factory.mktemp("reference")
    proc = subprocess.run([PY, "-m", "meshweave", "train", "--nproc", "4", "--set", f"run_dir={run_dir}", *CONFIG,
                           *LAYOUT], capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _start_both(nodes, run_dir, extra, tag, scratch):
    rdzv = f"{tag}-{uuid.uuid4().hex[:8]}"
    args = ["--set", f"run_dir={run_dir}", *CONFIG, *LAYOUT, *extra]
    return [nodes.torchrun(i, 2, rdzv, args, run_dir.parent / f"{run_dir.name}-node{i}.log", PY,
                           env={"NODE_SCRATCH": str(scratch[i])}) for i in (0, 1)]


def _logs(run_dir, tail=3000):
    texts = [(run_dir.parent / f"{run_dir.name}-node{i}.log").read_text() for i in (0, 1)]
    return "\n".join(f"--- node {i}:\n" + (text[-tail:] if tail else text) for i, text in enumerate(texts))


def _kill_node1_midway(nodes, procs, run_dir, persistent, after_step):
    """Wait for rank 0 to log 3 steps past `after_step` and for a persistent checkpoint past it, then kill
    node 1; node 0's launcher must end by itself. Returns the steps rank 0 logged."""
    metrics = run_dir / "metrics" / "rank0.jsonl"
    end = time.monotonic() + 240

    def ready() -> bool:
        logged = len(metrics.read_text().splitlines()) if metrics.exists() else 0
        saved = [int(m.group(1)) for p in persistent.glob("step_*") if (m := re.fullmatch(r"step_(\d{9})", p.name))]
        return logged >= 3 and max(saved, default=0) > after_step

    while not ready():
        assert time.monotonic() < end, f"no 3 steps and a persistent checkpoint past step {after_step} in 240 s\n" + _logs(run_dir)
        assert all(p.poll() is None for p in procs), _logs(run_dir)
        time.sleep(0.1)
    nodes.kill_node(1)
    codes = wait_all(nodes, procs, timeout=120)
    assert codes[0] not in (0, None), _logs(run_dir)  # node 0's launcher failed by itself, without being killed
    losses = _losses(run_dir)
    assert max(losses) < STEPS, "the run finished before the node was killed"
    return losses


def _resumed(run_dir) -> tuple[int, str]:
    """The step and the level (with its directory) that the restarted run says it resumed from."""
    logs = _logs(run_dir, tail=None)  # the line is rank 0's, printed on its node's log
    found = re.findall(r"resumed from checkpoint at step (\d+) \((\w+) level", logs)
    assert len(found) == 1, logs
    return int(found[0][0]), found[0][1]


def test_two_nodes_train_like_four_local_processes_through_two_node_failures(two_nodes, reference, tmp_path):  # noqa: F811
    """Kill node 1 -> same nodes resume from their own copies -> kill node 1, wipe its disk -> persistent."""
    scratch = [tmp_path / "scratch-node0", tmp_path / "scratch-node1"]
    persistent = tmp_path / "persistent"
    ckpt = ["--set", "checkpoint.dir=$NODE_SCRATCH/ckpt", "--set", "checkpoint.node_local=true",
            "--set", f"checkpoint.persistent_dir={persistent}", "--set", "checkpoint.levels=[local,persistent]",
            "--set", "checkpoint.every_steps=2", "--set", "checkpoint.mode=sync"]
    ref = reference

    first = tmp_path / "first"
    start = time.monotonic()
    losses = _kill_node1_midway(two_nodes, _start_both(two_nodes, first, ckpt, "first", scratch), first, persistent, 0)
    assert losses == {s: ref[s] for s in range(1, max(losses) + 1)}, _logs(first)
    first_done = max(losses)
    for rank in range(4):  # every rank wrote metrics: the world spans both nodes
        assert (first / "metrics" / f"rank{rank}.jsonl").exists()
    held = [sorted(p.name for p in (d / "ckpt").iterdir()) for d in scratch]
    assert held == [["rank_00000", "rank_00001"], ["rank_00002", "rank_00003"]], held  # each node: its ranks only

    # restart on the same nodes; the persistent level is moved away, so only the node-local copies can resume
    (tmp_path / "persistent-first").mkdir()
    persistent.rename(tmp_path / "persistent-first" / "persistent")
    second = tmp_path / "second"
    procs = _start_both(two_nodes, second, ckpt, "second", scratch)
    losses = _kill_node1_midway(two_nodes, procs, second, persistent, 0)
    step, level = _resumed(second)
    assert level == "local" and 2 <= step <= first_done and step % 2 == 0, _logs(second, tail=None)
    assert losses == {s: ref[s] for s in range(step + 1, max(losses) + 1)}, _logs(second)

    # node 1 comes back with an empty disk: its copies are gone, the persistent level has the newest step
    shutil.rmtree(scratch[1])
    newest = max(int(p.name[5:]) for p in persistent.glob("step_*"))
    third = tmp_path / "third"
    codes = wait_all(two_nodes, _start_both(two_nodes, third, ckpt, "third", scratch), timeout=240)
    assert codes == [0, 0], _logs(third)
    step, level = _resumed(third)
    assert (step, level) == (newest, "persistent"), _logs(third, tail=None)
    losses = _losses(third)
    assert losses == {s: ref[s] for s in range(step + 1, STEPS + 1)}
    print(f"2 nodes x 2 processes (dp2 x tp2), {STEPS} steps over three launches in {time.monotonic() - start:.1f} s: "
          f"node-local resume, then persistent step {step} after node 1 lost its disk")
