"""SWARM vs restart-from-checkpoint: throughput before, during and after a worker is killed, and time to recover.

Two runs of the same model (2 pipeline stages, 4 worker processes, the same global batches), each
with one worker SIGKILLed / crashed at the same step:

1. meshweave swarm: 2 stages x 2 peers + a coordinator (`fault_tolerance.mode: swarm`); the killed
   peer's microbatches are redone on the live peers and the run never restarts.
2. torchrun --max-restarts 1 with dp 2 x pp 2 and the lazy checkpointer every `--every` steps: the
   crash restarts every worker, which resume from the newest checkpoint and redo the lost steps.

torchft (a peer for replica-level fault tolerance) is reported as not run when it is not installed.
The timeline (committed steps against wall time) comes from SWARM's ledger and `train`'s metrics
files; recovery = the wall time from the last step committed before the failure to the next new one.

    python benchmarks/bench_swarm.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
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
    result = {"steps": steps, "kill_step": kill_step, "checkpoint_every": every, "swarm": swarm, "torchrun": torchrun,
              "summary": {"swarm": recovery(swarm["times"], swarm["steps"], kill_step),
                          "torchrun": recovery(torchrun["times"], torchrun["steps"], kill_step)},
              "torchft": "installed but not run by this script" if importlib.util.find_spec("torchft")
              else "not installed here (pip install torchft): not measured"}
    s, t = result["summary"]["swarm"], result["summary"]["torchrun"]
    result["ratios"] = {"recover_torchrun_over_swarm": t["recover_s"] / s["recover_s"],
                        "wall_torchrun_over_swarm": t["wall_s"] / s["wall_s"],
                        "steady_rate_swarm_over_torchrun": s["steps_per_s_before"] / t["steps_per_s_before"]}
    return result


def to_markdown(r: dict) -> str:
    rows = ["| run | steps/s before | steps/s after | time to recover (s) | steps redone | wall (s) |",
            "|---|---|---|---|---|---|"]
    for name, label in (("swarm", "meshweave swarm (2 stages x 2 peers)"),
                        ("torchrun", f"torchrun --max-restarts 1, lazy checkpoint every {r['checkpoint_every']}")):
        s = r["summary"][name]
        rows.append(f"| {label} | {s['steps_per_s_before']:.2f} | {s['steps_per_s_after']:.2f} | {s['recover_s']:.1f} | "
                    f"{s['steps_redone']} | {s['wall_s']:.1f} |")
    q = r["ratios"]
    return "\n".join([
        f"# SWARM vs restart from checkpoint ({r['steps']} steps, one worker killed at step {r['kill_step']})", "",
        *rows, "",
        f"- time to recover, torchrun / swarm: {q['recover_torchrun_over_swarm']:.2f}x",
        f"- whole run wall time, torchrun / swarm: {q['wall_torchrun_over_swarm']:.2f}x",
        f"- steady rate before the failure, swarm / torchrun's dp2 x pp2: {q['steady_rate_swarm_over_torchrun']:.2f}x",
        f"- swarm: {r['swarm']['aborted_attempts']} aborted attempt(s), redone on the live peers; the run never restarted",
        f"- torchft: {r['torchft']}", ""])


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, label in (("swarm", "meshweave swarm"), ("torchrun", "torchrun restart + lazy checkpoint")):
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
