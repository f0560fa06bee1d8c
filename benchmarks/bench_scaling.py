"""Scaling efficiency of data-parallel layouts, side by side in one run, with the real trainer.

For each layout the same global batch is trained for a few steps; we report the median step time,
global tokens/s, speed-up over one process and efficiency (speed-up / processes), and the
data-parallel bytes each rank moved per step against the analytic volume (FSDP2: 3x the parameter
shard all-gathered/reduce-scattered; DDP: one all-reduce of every gradient).

On a 2-core CPU machine the honest figures are the ratios and the byte counts; absolute numbers
come from running the same script on a GPU cluster (`--device cuda` under torchrun is not needed:
the script starts its own local processes).

    python benchmarks/bench_scaling.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from meshweave.models.llama.flops import parameter_count
from meshweave.train.build import build_trainer
from meshweave.train.config import load_config
from meshweave.testing import close_all_pools, run_distributed

LAYOUTS = [
    ("1 process", 1, []),
    ("dp=2 fsdp", 2, ["parallel.dp=2", "parallel.dp_mode=fsdp"]),
    ("dp=2 ddp", 2, ["parallel.dp=2", "parallel.dp_mode=ddp"]),
    ("dp=2 fsdp + AC", 2, ["parallel.dp=2", "parallel.dp_mode=fsdp", "parallel.activation_checkpointing=true"]),
    ("dp=2 fsdp accum=2", 2, ["parallel.dp=2", "parallel.dp_mode=fsdp", "train.grad_accum=2"]),
]


def _measure(overrides: list[str], steps: int, warmup: int) -> dict:
    # One process = one device: each gets one core's worth of threads, whatever the layout, so a
    # 1-process baseline is not an oversubscribed (OpenMP spin-waiting) multi-thread run.
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(None, [f"train.steps={steps + warmup}", f"run_dir={run_dir}", "logging.jsonl=false",
                                 "data.max_bytes=1000000", *overrides])
        trainer = build_trainer(cfg)
        for _ in range(warmup):
            trainer.train_step()
        trainer.p.mesh.ledger.reset()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - start)
        ledger = trainer.p.mesh.ledger.snapshot()
        trainer.p.mesh.close()
        return {"times": times, "ledger": ledger, "tokens": cfg.train.global_batch * cfg.train.seq_len,
                "params": parameter_count(cfg.model)}


def _dp_bytes(ledger: dict, steps: int) -> float:
    keys = [k for k in ledger if k.startswith("dp_sp:")]
    return sum(ledger[k]["bytes"] for k in keys) / steps


def _analytic_dp_bytes(name: str, params: int, world: int) -> float:
    """Per rank per step, fp32. Approximate for FSDP2: every unit counted as all-gathered twice, while
    [norm + head] is gathered once (about 0.7% of the total here); tests/test_dp_volume.py has the exact formula."""
    if world == 1:
        return 0.0
    if "ddp" in name:
        return 4.0 * params
    accum = 2 if "accum=2" in name else 1
    shard = params / world
    # all-gathers: twice per micro-step; reduce-scatter: the full gradients once per step.
    return 4.0 * (accum * 2 * shard + world * shard)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps (about a minute)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    steps, warmup = (4, 1) if args.quick else (12, 2)
    rows = []
    for name, world, overrides in LAYOUTS:
        res = run_distributed(_measure, world, overrides, steps, warmup, timeout=900)
        step_time = max(statistics.median(r["times"]) for r in res)
        rows.append({"layout": name, "world": world, "step_s": step_time, "tokens_per_s": res[0]["tokens"] / step_time,
                     "dp_bytes": _dp_bytes(res[0]["ledger"], steps),
                     "dp_bytes_analytic": _analytic_dp_bytes(name, res[0]["params"], world)})
        print(f"{name:>20}: {step_time * 1e3:8.1f} ms/step", flush=True)
    close_all_pools()
    base = rows[0]["step_s"]
    for row in rows:
        row["speedup"] = base / row["step_s"]
        row["efficiency"] = row["speedup"] / row["world"]
    write_report(rows, Path(args.out), steps)


def write_report(rows: list[dict], out: Path, steps: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Data-parallel scaling (real trainer, default model, same global batch)", "",
             f"median of {steps} steps; bytes are per rank per step through the ledger", "",
             "| layout | procs | ms/step | tokens/s | speed-up | efficiency | DP MB measured | DP MB analytic | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["dp_bytes"] / r["dp_bytes_analytic"] if r["dp_bytes_analytic"] else float("nan")
        lines.append(f"| {r['layout']} | {r['world']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['speedup']:.2f} | {r['efficiency']:.2f} | {r['dp_bytes'] / 1e6:.2f} | "
                     f"{r['dp_bytes_analytic'] / 1e6:.2f} | {ratio:.3f} |")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    (out / "scaling.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    plot(rows, out / "scaling.png")


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot written")
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([r["layout"] for r in rows], [r["efficiency"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_ylabel("scaling efficiency (speed-up / processes)")
    ax.set_title("Data-parallel layouts vs one process (same global batch)")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
