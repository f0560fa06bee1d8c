"""Measured step times of `sp: adaptive` against its peers on the same batches, on local CPU processes.

Each strategy (the FlexSP MILP, its greedy fallback, Megatron's greedy power-of-two rule, and every static
group size that holds the longest sequence) trains the same model on the same long-tailed documents for a
few steps; the first step is a warm-up. Every rank times its steps; a step's time is the slowest rank's.
Next to it: the step time the planner predicted under the cost model calibrated on these processes (the
same cached model for every strategy). Writes the JSON that `bench_adaptive_sp.py --measured` turns into
its "Measured" section:

    python benchmarks/bench_adaptive_measured.py --ranks 2 --steps 6
    python benchmarks/bench_adaptive_sp.py --quick --measured benchmarks/results/adaptive_sp_measured.json

On a 2-core machine with other work running the absolute times move with the load: read the ratios, and the
rounds (strategies interleaved) beside each other.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from meshweave.testing import close_all_pools, run_distributed
from meshweave.train.build import build_trainer
from meshweave.train.config import load_config

MODEL = ["model.dim=128", "model.n_layers=4", "model.n_heads=4", "model.n_kv_heads=4", "model.ffn_hidden=256"]
DATA = ["data.source=synthetic", "data.synthetic_mean_len=192", "data.synthetic_max_len=4096", "data.packing=false",
        "data.max_len=2048", "data.tokens_per_step=8192", "data.max_bytes=2000000"]


def settings(ranks: int, capacity: int) -> list[str]:
    return [*MODEL, *DATA, "parallel.sp=adaptive", "parallel.sp_method=ulysses", "logging.jsonl=false",
            "logging.every_steps=1000", f"parallel.adaptive.tokens_per_rank={capacity}", "train.lr=1e-3"]


def strategies(ranks: int, capacity: int, max_len: int = 2048) -> dict[str, list[str]]:
    """Strategy name -> its config overrides; static sizes that cannot hold the longest sequence are left out."""
    out = {"adaptive (milp)": ["parallel.adaptive.strategy=milp"], "greedy": ["parallel.adaptive.strategy=greedy"],
           "megatron": ["parallel.adaptive.strategy=megatron"]}
    size = 1
    while size <= ranks:
        if size * capacity >= max_len:
            out[f"static-{size}"] = ["parallel.adaptive.strategy=static", f"parallel.adaptive.static_size={size}"]
        size *= 2
    return out


def time_steps(overrides: list[str], steps: int, cache_home: str) -> dict:
    """Train `steps` steps; each step's wall time on this rank and (rank 0) the plan's prediction."""
    os.environ["XDG_CACHE_HOME"] = cache_home  # one calibration shared by every strategy
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = build_trainer(load_config(None, [*overrides, f"train.steps={steps}", f"run_dir={run_dir}"]))
        times, predicted, solve = [], [], []
        for _ in range(steps):
            start = time.perf_counter()
            float(trainer.train_step().loss)  # the loss on the host: the step is over
            times.append(time.perf_counter() - start)
            plan = trainer.p.runner.last_plan
            predicted.append(plan.predicted_s)
            solve.append(plan.solve_s)
        trainer.p.mesh.close()
        return {"times": times, "predicted": predicted, "solve": solve}


def measure(ranks: int, steps: int, rounds: int, capacity: int) -> dict:
    cache = tempfile.mkdtemp(prefix="meshweave-bench-cost-")
    base = settings(ranks, capacity)
    runs: dict[str, list[dict]] = {}
    for _ in range(rounds):
        for name, extra in strategies(ranks, capacity).items():
            per_rank = run_distributed(time_steps, ranks, [*base, *extra], steps, cache, timeout=1800)
            slowest = [max(r["times"][i] for r in per_rank) for i in range(steps)]
            runs.setdefault(name, []).append({"times": slowest[1:], "predicted": per_rank[0]["predicted"][1:],
                                              "solve": per_rank[0]["solve"][1:]})
            print(f"{name}: median step {sorted(slowest[1:])[len(slowest[1:]) // 2]:.3f} s", flush=True)
    close_all_pools()
    return {"label": f"{ranks} CPU processes (gloo, one thread each), {steps - 1} timed steps x {rounds} round(s), "
                     f"long-tailed synthetic documents up to 2,048 tokens, {capacity} tokens per rank per micro-batch, "
                     f"ulysses inside groups, the llama model of {' '.join(MODEL)}; load average "
                     f"{os.getloadavg()[0]:.1f} at the end",
            "rows": [{"mix": "long-tail (synthetic)", "n_ranks": ranks,
                      "predicted": {name: sum(sum(r["predicted"]) for r in rs) / sum(len(r["predicted"]) for r in rs)
                                    for name, rs in runs.items()},
                      "measured": {name: [t for r in rs for t in r["times"]] for name, rs in runs.items()}}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="steps per run, the first one a warm-up")
    parser.add_argument("--rounds", type=int, default=1, help="strategies interleaved this many times")
    parser.add_argument("--tokens-per-rank", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "adaptive_sp_measured.json")
    args = parser.parse_args()
    result = measure(args.ranks, args.steps, args.rounds, args.tokens_per_rank)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
