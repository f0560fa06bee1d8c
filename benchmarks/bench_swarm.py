"""SWARM vs restart-from-checkpoint: throughput before, during and after a worker is killed, and time to recover.

Runs of the same model (the first two: 2 pipeline stages, 4 worker processes, the same global
batches), each with one worker SIGKILLed / crashed at the same step:

1. meshweave swarm: 2 stages x 2 peers + a coordinator (`fault_tolerance.mode: swarm`); the killed
   peer's microbatches are redone on the live peers and the run never restarts.
2. torchrun --max-restarts 1 with dp 2 x pp 2 and the lazy checkpointer every `--every` steps: the
   crash restarts every worker, which resume from the newest checkpoint and redo the lost steps.
3. torchft (when installed; `pip install torchft`, or the `bench` extra): 2 replica groups of one process
   each (data parallelism: each replica holds the whole model and takes 4 of the 8 sequences of each
   global batch), a LighthouseServer in this process, torchft's Manager / DDP / OptimizerWrapper
   (benchmarks/torchft_replica.py). Replica 1 is SIGKILLed when replica 0 has committed the kill step
   and restarted at once with the same command; replica 0 goes on alone, and the restarted replica
   heals from its weights and optimizer state. torchft's data is lossy: the batches of the missing
   replica during the outage are not redone. Without torchft the row is reported as not measured.

The timeline (committed steps against wall time) comes from SWARM's ledger, `train`'s metrics
files and replica 0's commits under torchft; recovery = the wall time from the last step committed
before the failure to the next new one.

    python benchmarks/bench_swarm.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = ["model.dim=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=256",
         "model.vocab_size=320", "train.seq_len=64", "train.global_batch=8", "data.max_bytes=300000",
         "logging.every_steps=1", "train.warmup_steps=2"]


def _args(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHWEAVE_", "TORCHELASTIC_"))}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run_swarm(run_dir: Path, steps: int, kill_step: int) -> dict:
    overrides = [*MODEL, f"train.steps={steps}", f"run_dir={run_dir}", "fault_tolerance.mode=swarm",
                 "fault_tolerance.microbatches=4", "fault_tolerance.heartbeat_s=0.2", "fault_tolerance.dead_after_s=2",
                 "fault_tolerance.transfer_timeout_s=30", "fault_tolerance.rebalance_every_s=0"]
    proc = subprocess.run([sys.executable, "-m", "meshweave", "train", *_args(overrides)], capture_output=True, check=False,
                          text=True, timeout=1800, env=_env(MESHWEAVE_SWARM_FAULT=f"kill:point=forward:step={kill_step}:index=1"))
    if proc.returncode != 0:
        raise RuntimeError(f"swarm run failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    ledger = [json.loads(line) for line in (run_dir / "swarm" / "ledger.jsonl").read_text().splitlines()]
    return {"times": [e["time"] for e in ledger], "steps": [e["step"] + 1 for e in ledger],
            "losses": [e["loss"] for e in ledger], "failures": ledger[-1]["failures"],
            "aborted_attempts": ledger[-1]["aborted_attempts"], "recoveries_s": ledger[-1]["recoveries_s"]}


def run_torchrun(run_dir: Path, steps: int, kill_step: int, every: int) -> dict:
    overrides = [*MODEL, f"train.steps={steps}", f"run_dir={run_dir}", "parallel.dp=2", "parallel.pp=2",
                 "parallel.microbatches=2", f"checkpoint.dir={run_dir / 'ckpt'}", f"checkpoint.every_steps={every}",
                 "checkpoint.mode=lazy"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", "--max-restarts", "1",
           "-m", "meshweave", "train", *_args(overrides)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False,
                          env=_env(MESHWEAVE_FAULT=f"crash:rank=1:step={kill_step}", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun run failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()]
    return {"times": [r["time"] for r in records], "steps": [r["step"] for r in records],
            "losses": [r["loss"] for r in records]}


TORCHFT_HEARTBEAT_TIMEOUT_MS = 2000  # the lighthouse drops a silent replica after this (swarm: dead_after_s=2)


def _records(path: Path) -> list[dict]:
    """The complete JSON lines of a file that another process is appending to."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line]


def _restarted(path: Path) -> list[dict]:
    """The lines of the restarted replica: those after the second "ready" line (none before it is ready)."""
    records = _records(path)
    ready = [i for i, rec in enumerate(records) if "ready" in rec]
    return records[ready[1] + 1:] if len(ready) > 1 else []


def run_torchft(run_dir: Path, steps: int, kill_step: int) -> dict:
    """2 torchft replica groups (dp 2, one process each); replica 1 SIGKILLed at kill_step and restarted."""
    from torchft.coordination import LighthouseServer

    run_dir.mkdir(parents=True)
    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=1, heartbeat_timeout_ms=TORCHFT_HEARTBEAT_TIMEOUT_MS)
    go, timelines = run_dir / "go", [run_dir / f"replica{r}.jsonl" for r in (0, 1)]

    def start(replica: int) -> subprocess.Popen:
        cmd = [sys.executable, str(Path(__file__).with_name("torchft_replica.py")), "--lighthouse", lighthouse.address(),
               "--replica-id", str(replica), "--replicas", "2", "--steps", str(steps), "--timeline",
               str(timelines[replica]), "--start-file", str(go), *_args(MODEL)]
        with (run_dir / f"replica{replica}.log").open("a") as log:  # the child keeps its own descriptor
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())

    def failed(what: str) -> RuntimeError:
        tails = "".join(f"--- replica{r}.log\n" + (run_dir / f"replica{r}.log").read_text()[-2000:] for r in (0, 1))
        return RuntimeError(f"torchft run failed: {what}\n{tails}")

    procs = [start(0), start(1)]
    killed: dict = {}
    deadline = time.time() + 1800
    try:
        while sum(1 for path in timelines for rec in _records(path) if "ready" in rec) < 2:
            if any(p.poll() is not None for p in procs) or time.time() > deadline:
                raise failed("a replica exited before it was ready")
            time.sleep(0.05)
        go.touch()  # both replicas heartbeat to the lighthouse: the first quorum holds both
        while procs[0].poll() is None and not any(rec.get("step") == steps for rec in _records(timelines[0])):
            if time.time() > deadline:
                raise failed("timed out")
            if not killed:
                if procs[1].poll() is not None:
                    raise failed("replica 1 exited before the kill step")
                done = [rec["step"] for rec in _records(timelines[0]) if "step" in rec]
                if done and done[-1] >= kill_step:
                    os.kill(procs[1].pid, signal.SIGKILL)
                    killed = {"time": time.time(), "replica0_step": done[-1]}
                    procs[1].wait()
                    procs[1] = start(1)  # the same command: it heals from replica 0
            time.sleep(0.01)
        if not killed:
            raise failed("replica 0 finished before the kill step")
        if not any(rec.get("participants", 0) > 1 for rec in _restarted(timelines[1])) and procs[1].poll() is None:
            procs[1].kill()  # replica 0 is done and replica 1 has not rejoined: alone, it would start a new run
            procs[1].wait()
        try:
            procs[0].wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise failed("replica 0 did not exit after its last step") from None
        if procs[0].returncode != 0:
            raise failed(f"replica 0 exited with {procs[0].returncode}")
        if procs[1].poll() is None:  # it rejoined: it commits the last step with replica 0, then exits
            try:
                procs[1].wait(timeout=120)
            except subprocess.TimeoutExpired:
                raise failed("the restarted replica 1 did not finish") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        lighthouse.shutdown()
    records = [rec for rec in _records(timelines[0]) if "step" in rec]
    ready1 = [rec["time"] for rec in _records(timelines[1]) if "ready" in rec]
    times, steps_done = [rec["time"] for rec in records], [rec["step"] for rec in records]
    participants = [rec["participants"] for rec in records]
    # The failure shows as replica 0's first step committed alone after the kill; the step before it is
    # the last one committed before the failure (the kill may land after replica 0 began its next step).
    alone = next((i for i, (t, n) in enumerate(zip(times, participants)) if n < 2 and t >= killed["time"]), None)
    failure_step = steps_done[alone - 1] if alone is not None and alone > 0 else killed["replica0_step"]
    rejoin = next((rec for rec in _restarted(timelines[1]) if rec.get("participants", 0) > 1), None)
    return {"times": times, "steps": steps_done, "losses": [rec["loss"] for rec in records],
            "participants": participants, "failure_step": failure_step, "killed_at_replica0_step": killed["replica0_step"],
            "restart_ready_s": ready1[-1] - killed["time"] if len(ready1) > 1 else None,
            "rejoined_step": rejoin["step"] if rejoin else None,
            "rejoined_after_s": rejoin["time"] - killed["time"] if rejoin else None,
            "steps_alone": sum(1 for n in participants if n < 2),
            "sequences_per_replica": int(next(o for o in MODEL if o.startswith("train.global_batch=")).split("=")[1]) // 2,
            "heartbeat_timeout_s": TORCHFT_HEARTBEAT_TIMEOUT_MS / 1000}


def recovery(times: list[float], steps: list[int], kill_step: int) -> dict:
    """Rates before and after the failure, and the wall time from the last step before it to the next new step."""
    reached = max(s for s in steps if s <= kill_step)  # the last step logged before the failure
    last_before = steps.index(reached)
    next_new = next(i for i in range(last_before + 1, len(steps)) if steps[i] > reached)
    before = (steps[last_before] - steps[0]) / (times[last_before] - times[0])
    after = (steps[-1] - steps[next_new]) / (times[-1] - times[next_new])
    redone = sum(1 for i, s in enumerate(steps) if any(s == t for t in steps[:i]))
    return {"steps_per_s_before": before, "steps_per_s_after": after, "recover_s": times[next_new] - times[last_before],
            "steps_redone": redone, "wall_s": times[-1] - times[0], "total_steps": steps[-1]}


def run(quick: bool, every: int) -> dict:
    steps = 24 if quick else 60
    kill_step = steps // 3
    with tempfile.TemporaryDirectory() as tmp:
        swarm = run_swarm(Path(tmp) / "swarm", steps, kill_step)
        torchrun = run_torchrun(Path(tmp) / "torchrun", steps, kill_step, every)
        torchft = run_torchft(Path(tmp) / "torchft", steps, kill_step) if importlib.util.find_spec("torchft") \
            else "not installed here (pip install torchft): not measured"
    result = {"steps": steps, "kill_step": kill_step, "checkpoint_every": every, "swarm": swarm, "torchrun": torchrun,
              "summary": {"swarm": recovery(swarm["times"], swarm["steps"], kill_step),
                          "torchrun": recovery(torchrun["times"], torchrun["steps"], kill_step)},
              "torchft": torchft}
    if isinstance(torchft, dict):
        result["summary"]["torchft"] = recovery(torchft["times"], torchft["steps"], torchft["failure_step"])
    s, t = result["summary"]["swarm"], result["summary"]["torchrun"]
    result["ratios"] = {"recover_torchrun_over_swarm": t["recover_s"] / s["recover_s"],
                        "wall_torchrun_over_swarm": t["wall_s"] / s["wall_s"],
                        "steady_rate_swarm_over_torchrun": s["steps_per_s_before"] / t["steps_per_s_before"]}
    if isinstance(torchft, dict):
        f = result["summary"]["torchft"]
        result["ratios"]["recover_torchft_over_swarm"] = f["recover_s"] / s["recover_s"]
    return result


def _torchft_notes(r: dict) -> list[str]:
    f = r["torchft"]
    if not isinstance(f, dict):
        return [f"- torchft: {f}"]
    rejoined = (f"was ready again {f['restart_ready_s']:.1f} s after the kill and rejoined at step {f['rejoined_step']} "
                f"({f['rejoined_after_s']:.1f} s after the kill), healed from replica 0's weights and optimizer state"
                if f["rejoined_step"] is not None else
                "had not rejoined when replica 0 finished (it was stopped: it would have started a new run alone)")
    return [
        (f"- torchft: replica 1 SIGKILLed once replica 0 had committed step {f['killed_at_replica0_step']} (its last "
         f"step committed with both replicas: {f['failure_step']}), restarted at once with the same command; it "
         f"{rejoined}. The lighthouse drops a silent replica after {f['heartbeat_timeout_s']:g} s (swarm: "
         "dead_after_s 2); the row is replica 0's commits"),
        (f"- torchft's data is lossy: replica 0 committed {f['steps_alone']} step(s) alone, each on its "
         f"{f['sequences_per_replica']} of the {2 * f['sequences_per_replica']} sequences of the global batch; the "
         f"missing replica's {f['steps_alone'] * f['sequences_per_replica']} sequences are not redone (0 steps "
         "redone is not 0 data lost)"),
        ("- torchft is data parallelism over 2 processes (each holds the whole model), not a 2-stage pipeline over 4 "
         "processes like the other two rows: its rates are not comparable one to one"),
        f"- time to recover, torchft / swarm: {r['ratios']['recover_torchft_over_swarm']:.2f}x"]


def to_markdown(r: dict) -> str:
    rows = ["| run | steps/s before | steps/s after | time to recover (s) | steps redone | wall (s) |",
            "|---|---|---|---|---|---|"]
    for name, label in (("swarm", "meshweave swarm (2 stages x 2 peers)"),
                        ("torchrun", f"torchrun --max-restarts 1, lazy checkpoint every {r['checkpoint_every']}")):
        s = r["summary"][name]
        rows.append(f"| {label} | {s['steps_per_s_before']:.2f} | {s['steps_per_s_after']:.2f} | {s['recover_s']:.1f} | "
                    f"{s['steps_redone']} | {s['wall_s']:.1f} |")
    if "torchft" in r["summary"]:
        s = r["summary"]["torchft"]
        rows.append(f"| torchft (2 replica groups x 1 process, dp2; replica 1 killed and restarted) | "
                    f"{s['steps_per_s_before']:.2f} | {s['steps_per_s_after']:.2f} | {s['recover_s']:.1f} | "
                    f"{s['steps_redone']} | {s['wall_s']:.1f} |")
    q = r["ratios"]
    return "\n".join([
        f"# SWARM vs restart from checkpoint ({r['steps']} steps, one worker killed at step {r['kill_step']})", "",
        *rows, "",
        f"- time to recover, torchrun / swarm: {q['recover_torchrun_over_swarm']:.2f}x",
        f"- whole run wall time, torchrun / swarm: {q['wall_torchrun_over_swarm']:.2f}x",
        f"- steady rate before the failure, swarm / torchrun's dp2 x pp2: {q['steady_rate_swarm_over_torchrun']:.2f}x",
        f"- swarm: {r['swarm']['aborted_attempts']} aborted attempt(s), redone on the live peers; the run never restarted",
        *_torchft_notes(r), ""])


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    runs = [("swarm", "meshweave swarm"), ("torchrun", "torchrun restart + lazy checkpoint")]
    if isinstance(r["torchft"], dict):
        runs.append(("torchft", "torchft dp2 (replica 0's commits)"))
    for name, label in runs:
        times, steps = r[name]["times"], r[name]["steps"]
        ax.plot([t - times[0] for t in times], steps, marker=".", label=label)
    ax.axhline(r["kill_step"], color="grey", linestyle=":", label=f"worker killed at step {r['kill_step']}")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("committed step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--every", type=int, default=5, help="checkpoint interval of the torchrun baseline")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    result = run(args.quick, args.every)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "swarm.json").write_text(json.dumps(result, indent=1))
    (out / "swarm.md").write_text(to_markdown(result))
    try:
        plot(result, out / "swarm.png")
    except ImportError:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
    print(to_markdown(result))
    print(f"wrote {out / 'swarm.md'}, {out / 'swarm.json'}, {out / 'swarm.png'}")


if __name__ == "__main__":
    main()
