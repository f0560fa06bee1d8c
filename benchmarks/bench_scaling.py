"""Scaling efficiency of data- and tensor-parallel layouts, side by side in one run, with the real trainer.

For each layout the same global batch is trained for a few steps; we report the median step time,
global tokens/s, speed-up over one process and efficiency (speed-up / processes), and the
data-parallel bytes each rank moved per step against the analytic volume (FSDP2: 3x the parameter
shard all-gathered/reduce-scattered; DDP: one all-reduce of every gradient). Bytes need the comm
ledger (`logging.comm_accounting`, off by default since it costs time: the TP counter is a Python
dispatch mode); `--accounting both` times every layout with it off and on, interleaved.

Default (no --layouts): the weak/strong scaling study (`meshweave bench scaling`). Over the layouts that
fit the processes at hand (--procs, default 1, 2 and 4 up to the cores: dp, tp, sp, pp alone, each where it
divides the model and sequence), strong scaling keeps the global batch, weak scaling multiplies the work by
the processes (the sequence for sp, the global batch otherwise). Each run counts its bytes in the ledger and
the report sets them per dimension against the analytic volume (bench_scaling_model.py), and projects the
measured layouts and pure FSDP at 8..1024 GPUs onto an assumed GPU cluster from a cost model calibrated by
this run's compute time per token (every projected figure is labelled so, with its inputs). Writes
scaling.{md,json,png}; the JSON keeps the raw per-step times and ledgers, from which every ratio recomputes.

    python benchmarks/bench_scaling.py --quick          # tiny model, 1 and 2 processes (about a minute)
    python benchmarks/bench_scaling.py --procs 1 2 4    # the default model

The layout comparison below (--layouts) is the earlier table: dp/tp variants, strong scaling only.

On a 2-core CPU machine the honest figures are the ratios and the byte counts; absolute numbers
come from running the same script on a GPU cluster (`--device cuda` under torchrun is not needed:
the script starts its own local processes).

    python benchmarks/bench_scaling.py [--quick] [--out benchmarks/results]
    python benchmarks/bench_scaling.py --layouts dp2-fsdp tp2 --accounting both --rounds 3

Before/after a change: `--before-after TREE` runs, in interleaved rounds, (1) the benchmark script of
the checkout TREE with its own code (PYTHONPATH=TREE), (2) this script's measurement on TREE's code
for layouts that script lacks (e.g. tp2; only the import paths differ), and (3) this script on this
checkout with accounting off and on, and writes scaling_before_after.{md,json}:

    git worktree add /tmp/mw_before f1651b4
    python benchmarks/bench_scaling.py --before-after /tmp/mw_before --layouts dp2-fsdp dp2-ddp tp2 --quick --rounds 3

The same script runs on both trees: imports fall back to the layout before the core/train split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_scaling_model beside this script
import bench_scaling_model as model  # noqa: E402

try:  # this checkout
    from meshweave.models.llama.flops import parameter_count
    from meshweave.train.build import build_trainer
    from meshweave.train.config import load_config
except ImportError:  # checkouts before the core/ + train/ split (e.g. f1651b4), for --before-after
    from meshweave.models import parameter_count
    from meshweave.runtime.build import build_trainer
    from meshweave.runtime.config import load_config
from meshweave.testing import close_all_pools, run_distributed

# key -> (label, processes, config overrides)
LAYOUTS: dict[str, tuple[str, int, list[str]]] = {
    "1": ("1 process", 1, []),
    "dp2-fsdp": ("dp=2 fsdp", 2, ["parallel.dp=2", "parallel.dp_mode=fsdp"]),
    "dp2-ddp": ("dp=2 ddp", 2, ["parallel.dp=2", "parallel.dp_mode=ddp"]),
    "dp2-fsdp-ac": ("dp=2 fsdp + AC", 2, ["parallel.dp=2", "parallel.dp_mode=fsdp", "parallel.activation_checkpointing=true"]),
    "dp2-fsdp-accum2": ("dp=2 fsdp accum=2", 2, ["parallel.dp=2", "parallel.dp_mode=fsdp", "train.grad_accum=2"]),
    "tp2": ("tp=2", 2, ["parallel.dp=1", "parallel.tp=2"]),
}
# the layouts of the script before --layouts existed (what its own run measures)
BEFORE_SCRIPT_LABELS = {label: key for key, (label, _, _) in LAYOUTS.items()}


def has_accounting_option() -> bool:
    """Whether this checkout's config has `logging.comm_accounting` (before it existed, accounting was always on)."""
    cfg = load_config(None, [])
    return any(f.name == "comm_accounting" for f in dataclasses.fields(cfg.logging))


def _timed_steps(trainer, steps: int, warmup: int) -> tuple[list[float], list[float], dict]:
    """Warm up, then time `steps` optimizer steps: wall and CPU seconds of each, and the ledger of the timed ones."""
    for _ in range(warmup):
        trainer.train_step()
    trainer.p.mesh.ledger.reset()
    times, cpu = [], []
    for _ in range(steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.train_step()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)  # all threads of this process: robust to other jobs' load
    return times, cpu, trainer.p.mesh.ledger.snapshot()


def _measure(overrides: list[str], steps: int, warmup: int) -> dict:
    # One process = one device: each gets one core's worth of threads, whatever the layout, so a
    # 1-process baseline is not an oversubscribed (OpenMP spin-waiting) multi-thread run.
    torch.set_num_threads(1)
    import meshweave

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(None, [f"train.steps={steps + warmup}", f"run_dir={run_dir}", "logging.jsonl=false",
                                 "data.max_bytes=1000000", *overrides])
        trainer = build_trainer(cfg)
        times, cpu, ledger = _timed_steps(trainer, steps, warmup)
        trainer.p.mesh.close()
        return {"times": times, "cpu": cpu, "ledger": ledger, "tokens": cfg.train.global_batch * cfg.train.seq_len,
                "params": parameter_count(cfg.model), "meshweave": str(Path(meshweave.__file__).parent)}


def _dp_bytes(ledger: dict, steps: int) -> float:
    keys = [k for k in ledger if k.startswith("dp_sp:")]
    return sum(ledger[k]["bytes"] for k in keys) / steps


def _tp_bytes(ledger: dict, steps: int) -> float:
    return sum(v["bytes"] for k, v in ledger.items() if k.startswith("tp/")) / steps


def _analytic_dp_bytes(name: str, params: int, world: int) -> float:
    """Per rank per step, fp32. Approximate for FSDP2: every unit counted as all-gathered twice, while
    [norm + head] is gathered once (about 0.7% of the total here); tests/test_dp_volume.py has the exact formula."""
    if world == 1 or "dp=" not in name:
        return 0.0
    if "ddp" in name:
        return 4.0 * params
    accum = 2 if "accum=2" in name else 1
    shard = params / world
    # all-gathers: twice per micro-step; reduce-scatter: the full gradients once per step.
    return 4.0 * (accum * 2 * shard + world * shard)


def measure_layouts(keys: list[str], accounting: list[str], steps: int, warmup: int, rounds: int) -> list[dict]:
    """Every (layout, accounting) `rounds` times, interleaved; one row per pair (median over rounds
    of the per-round median step time, slowest rank)."""
    accounting_option = has_accounting_option()
    runs: dict[tuple[str, str], list[dict]] = {}
    for r in range(rounds):
        for key in keys:
            label, world, overrides = LAYOUTS[key]
            for acc in accounting:
                extra = [f"logging.comm_accounting={'true' if acc == 'on' else 'false'}"] if accounting_option else []
                res = run_distributed(_measure, world, [*overrides, *extra], steps, warmup, timeout=900)
                runs.setdefault((key, acc), []).append(res)
                step = max(statistics.median(x["times"]) for x in res)
                print(f"round {r + 1}/{rounds} {label:>20} accounting {acc if accounting_option else 'always on'}: "
                      f"{step * 1e3:8.1f} ms/step", flush=True)
    close_all_pools()
    rows = []
    for (key, acc), results in runs.items():
        label, world, _ = LAYOUTS[key]
        per_round = [max(statistics.median(x["times"]) for x in res) for res in results]
        cpu_round = [max(statistics.median(x["cpu"]) for x in res) for res in results]
        # best step (slowest rank of each step): other jobs' load only ever adds time, so the minimum is the
        # least noisy estimate on a shared machine
        best = min(max(steps_) for res in results for steps_ in zip(*(x["times"] for x in res)))
        best_cpu = min(max(steps_) for res in results for steps_ in zip(*(x["cpu"] for x in res)))
        first = results[0][0]
        rows.append({"key": key, "layout": label, "world": world,
                     "accounting": acc if accounting_option else "always on",
                     "step_s": statistics.median(per_round), "step_s_rounds": per_round,
                     "cpu_s": statistics.median(cpu_round), "cpu_s_rounds": cpu_round,
                     "best_step_s": best, "best_cpu_s": best_cpu,
                     "tokens_per_s": first["tokens"] / statistics.median(per_round),
                     "dp_bytes": _dp_bytes(first["ledger"], steps), "tp_bytes": _tp_bytes(first["ledger"], steps),
                     "dp_bytes_analytic": _analytic_dp_bytes(label, first["params"], world),
                     "meshweave": first["meshweave"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer steps (about a minute)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=None,
                        help="the earlier dp/tp layout table instead of the weak/strong study ('1' is always added)")
    parser.add_argument("--procs", type=int, nargs="+", default=None,
                        help="study: process counts (default: 1 2 4 up to the cores, at least 1 2)")
    parser.add_argument("--steps", type=int, default=None, help="study: timed steps per run (default 5, quick 2)")
    parser.add_argument("--peak-tflops", type=float, default=model.Cluster.peak_tflops, help="projection: GPU peak")
    parser.add_argument("--mfu", type=float, default=model.Cluster.mfu, help="projection: achieved fraction of peak")
    parser.add_argument("--intra-gbps", type=float, default=model.Cluster.intra_gbps, help="projection: NVLink GB/s")
    parser.add_argument("--inter-gbps", type=float, default=model.Cluster.inter_gbps, help="projection: network GB/s")
    parser.add_argument("--project-tokens-per-gpu", type=int, default=16384,
                        help="projection: tokens per GPU per step of the projected FSDP weak scaling")
    parser.add_argument("--accounting", choices=("off", "on", "both"), default="off",
                        help="logging.comm_accounting for every layout (both: each layout twice, interleaved)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of the whole set")
    parser.add_argument("--raw-json", help="write the rows here and nothing else (used by --before-after)")
    parser.add_argument("--before-after", metavar="TREE", help="compare with the checkout at TREE (see the docstring)")
    args = parser.parse_args()
    steps, warmup = (4, 1) if args.quick else (12, 2)
    if args.layouts is None and not args.before_after and not args.raw_json:
        if args.accounting != "off" or args.rounds != 1:
            parser.error("--accounting/--rounds belong to the --layouts table (the study always counts bytes)")
        run_study(args)
        return
    args.layouts = args.layouts or list(LAYOUTS)
    if args.before_after:
        before_after(Path(args.before_after), args)
        return
    keys = args.layouts if args.raw_json or "1" in args.layouts else ["1", *args.layouts]
    accounting = ["off", "on"] if args.accounting == "both" else [args.accounting]
    rows = measure_layouts(keys, accounting, steps, warmup, args.rounds)
    if args.raw_json:
        Path(args.raw_json).write_text(json.dumps({"steps": steps, "rows": rows}, indent=1))
        return
    base = {r["accounting"]: r["step_s"] for r in rows if r["key"] == "1"}
    for row in rows:
        row["speedup"] = base[row["accounting"]] / row["step_s"]
        row["efficiency"] = row["speedup"] / row["world"]
    write_report(rows, Path(args.out), steps, args.rounds)


def write_report(rows: list[dict], out: Path, steps: int, rounds: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Data- and tensor-parallel scaling (real trainer, default model, same global batch)", "",
             f"median of {steps} steps (median over {rounds} interleaved round(s)); bytes are per rank per step through the "
             f"ledger (only with accounting on); load average at the end {'/'.join(f'{x:.1f}' for x in os.getloadavg())}", "",
             "| layout | procs | accounting | ms/step | tokens/s | speed-up | efficiency | DP MB measured | DP MB analytic | ratio | TP MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        counted = r["accounting"] != "off"
        ratio = r["dp_bytes"] / r["dp_bytes_analytic"] if r["dp_bytes_analytic"] and counted else float("nan")
        dp_mb = f"{r['dp_bytes'] / 1e6:.2f}" if counted else "n/a"
        tp_mb = f"{r['tp_bytes'] / 1e6:.2f}" if counted and r["tp_bytes"] else ("n/a" if not counted else "")
        lines.append(f"| {r['layout']} | {r['world']} | {r['accounting']} | {r['step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['speedup']:.2f} | {r['efficiency']:.2f} | {dp_mb} | "
                     f"{r['dp_bytes_analytic'] / 1e6:.2f} | {ratio:.3f} | {tp_mb} |")
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
    ax.bar([f"{r['layout']}\n(acct {r['accounting']})" for r in rows], [r["efficiency"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    ax.set_ylabel("scaling efficiency (speed-up / processes)")
    ax.set_title("Parallel layouts vs one process (same global batch)")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- before/after a change -------------------------------------------------------------------
def before_after(tree: Path, args: argparse.Namespace) -> None:
    """Interleaved rounds of: TREE's own script on TREE's code; this script on TREE's code (layouts TREE's
    script lacks, and the others as a cross-check); this script on this checkout, accounting off and on.
    Writes scaling_before_after.{md,json}."""
    here, tree = Path(__file__).resolve(), tree.resolve()
    this_repo = here.parents[1]
    own_script = tree / "benchmarks" / "bench_scaling.py"
    if not own_script.exists():
        raise SystemExit(f"--before-after: {own_script} not found (make a worktree: git worktree add {tree} COMMIT)")
    quick = ["--quick"] if args.quick else []
    keys = [k for k in args.layouts if k != "1"]
    loads = [os.getloadavg()]
    # (version, source, layout key) -> {"wall": [per-round s], "cpu": [...]}; source: "own script" or the accounting
    samples: dict[tuple[str, str, str], dict[str, list[float]]] = {}
    ledgers: dict[str, dict] = {}
    jobs = [("before", "own script"), ("before", "on"), ("after", "off"), ("after", "on")]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for version, source in jobs[r % len(jobs):] + jobs[:r % len(jobs)]:  # rotated: no job always runs first
                tree_of = tree if version == "before" else this_repo
                env = {**os.environ, "PYTHONPATH": str(tree_of)}
                if source == "own script":
                    if not any(LAYOUTS[k][0] in BEFORE_SCRIPT_LABELS and k.startswith("dp") for k in keys):
                        continue  # its script times only dp layouts
                    out = Path(tmp) / f"own{r}"
                    _run([sys.executable, str(own_script), *quick, "--out", str(out)], env, tree_of)
                    for row in json.loads((out / "scaling.json").read_text()):
                        key = BEFORE_SCRIPT_LABELS.get(row["layout"])
                        if key in keys or key == "1":
                            samples.setdefault((version, source, key), {"wall": []})["wall"].append(row["step_s"])
                    continue
                raw = Path(tmp) / f"{version}-{source}-{r}.json"
                _run([sys.executable, str(here), *quick, "--layouts", *keys, "--accounting", source, "--raw-json", str(raw)],
                     env, tree_of)
                for row in json.loads(raw.read_text())["rows"]:
                    entry = samples.setdefault((version, row["accounting"], row["key"]),
                                               {"wall": [], "cpu": [], "best_wall": [], "best_cpu": []})
                    entry["wall"].append(row["step_s"])
                    entry["cpu"].append(row["cpu_s"])
                    entry["best_wall"].append(row["best_step_s"])
                    entry["best_cpu"].append(row["best_cpu_s"])
                    ledgers[f"{version}|{row['accounting']}|{row['key']}"] = {
                        "meshweave": row["meshweave"], "dp_bytes": row["dp_bytes"], "tp_bytes": row["tp_bytes"]}
            loads.append(os.getloadavg())
            print(f"round {r + 1}/{args.rounds} done; load {loads[-1]}", flush=True)
    write_before_after(samples, ledgers, tree, keys, args, loads)


def _run(cmd: list[str], env: dict, cwd: Path) -> None:
    print("$ PYTHONPATH=" + env["PYTHONPATH"] + " " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    print("\n".join(line for line in proc.stdout.splitlines() if "ms/step" in line), flush=True)


def _commit(tree: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def write_before_after(samples: dict, ledgers: dict, tree: Path, keys: list[str], args: argparse.Namespace,
                       loads: list[tuple[float, float, float]]) -> None:
    before_c, after_c = _commit(tree), _commit(Path(__file__).resolve().parents[1])
    rows = [_before_after_row(samples, key) for key in keys]
    lines = _before_after_header(before_c, after_c, args, loads) + _before_after_tables(rows)
    one = _sample_ms(samples, "before", "own script", "1")
    if one:
        lines += ["", f"One process before (old script, wall): {one:.1f} ms/step."]
    lines += ["", "Ratios: before / after > 1 means after is faster; on / off > 1 means accounting costs that factor.",
              "Per-round samples are in scaling_before_after.json.", "",
              f"Command: `python benchmarks/bench_scaling.py {' '.join(sys.argv[1:])}`", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling_before_after.md").write_text("\n".join(lines))
    (out / "scaling_before_after.json").write_text(json.dumps(
        {"before": before_c, "after": after_c, "rounds": args.rounds, "quick": args.quick, "loads": loads, "rows": rows,
         "ledgers": ledgers}, indent=1))
    print("\n".join(lines))


def _sample_ms(samples: dict, version: str, source: str, key: str, what: str = "wall") -> float | None:
    """Median over rounds of the per-run medians; for best_*: the best step over all rounds."""
    values = samples.get((version, source, key), {}).get(what)
    if not values:
        return None
    return 1e3 * (min(values) if what.startswith("best") else statistics.median(values))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _f1(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def _f2(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _before_after_row(samples: dict, key: str) -> dict:
    """One layout's figures: wall and CPU medians before and after (accounting off/on), best steps, ratios."""
    def ms(version: str, source: str, what: str = "wall") -> float | None:
        return _sample_ms(samples, version, source, key, what)

    own, harness = ms("before", "own script"), ms("before", "always on")
    before = own if own is not None else harness
    off, on = ms("after", "off"), ms("after", "on")
    cpu_before, cpu_off, cpu_on = ms("before", "always on", "cpu"), ms("after", "off", "cpu"), ms("after", "on", "cpu")
    best = {f"{what}_{v}_{src}": ms(v, src, f"best_{what}") for what in ("wall", "cpu")
            for v, src in (("before", "always on"), ("after", "off"), ("after", "on"))}
    return {
        "layout": LAYOUTS[key][0], "key": key, "best_ms": best,
        "before_ms": before, "before_by": "own script" if own is not None else "this script on the old code",
        "before_harness_ms": harness, "after_off_ms": off, "after_on_ms": on,
        "before_over_after_off": _ratio(before, off), "before_over_after_on": _ratio(before, on), "on_over_off": _ratio(on, off),
        "cpu_before_ms": cpu_before, "cpu_after_off_ms": cpu_off, "cpu_after_on_ms": cpu_on,
        "cpu_before_over_after_off": _ratio(cpu_before, cpu_off), "cpu_before_over_after_on": _ratio(cpu_before, cpu_on),
        "cpu_on_over_off": _ratio(cpu_on, cpu_off),
        "samples_ms": {f"{v}|{src}|{what}": [1e3 * x for x in vals[what]]
                       for (v, src, k), vals in samples.items() if k == key for what in vals if vals[what]},
    }


def _before_after_header(before_c: str, after_c: str, args: argparse.Namespace,
                         loads: list[tuple[float, float, float]]) -> list[str]:
    steps = "4 (+1 warm-up)" if args.quick else "12 (+2 warm-up)"
    return [
        f"# Step time before ({before_c}) and after ({after_c}) the layering refactor, and the cost of comm accounting", "",
        f"Real trainer, default model (dim 256, 4 layers, seq 256, global batch 8), same batches; per run the median of "
        f"{steps} steps (slowest rank); the median over {args.rounds} interleaved rounds (the order of the four runs "
        "rotates each round). 2-core CPU machine, gloo, one thread per process.", "",
        "Load average (1/5/15 min) before the first round and after each: "
        + "; ".join("/".join(f"{x:.1f}" for x in load) for load in loads)
        + ". Other jobs shared the machine, so wall times carry large noise; the CPU time of a step (process time "
        "of all the rank's threads, slowest rank) is much less sensitive to that and is the better figure for "
        "these ratios.", "",
        "Before: the dp layouts by the old commit's own `bench_scaling.py` on its own code (`PYTHONPATH=<worktree>`); "
        "its script has no TP layout, so tp=2 before is timed by this `bench_scaling.py` run on the old code (only "
        "the import paths differ; it also re-times the dp layouts, 'before (this script)'). The old code always "
        "counts comm bytes (no option then). After: this checkout with `logging.comm_accounting=false` (the new "
        "default) and `=true`.", "",
        "Wall time per step (ms):", "",
        "| layout | before | before (this script) | after, accounting off | after, accounting on | before / after(off) | "
        "before / after(on) | on / off |",
        "|---|---|---|---|---|---|---|---|",
    ]


def _before_after_tables(rows: list[dict]) -> list[str]:
    """The wall, CPU and best-step tables (the wall table's header ends the report's header)."""
    lines = []
    for r in rows:
        lines.append(f"| {r['layout']} | {_f1(r['before_ms'])} ({r['before_by']}) | {_f1(r['before_harness_ms'])} | "
                     f"{_f1(r['after_off_ms'])} | {_f1(r['after_on_ms'])} | {_f2(r['before_over_after_off'])} | "
                     f"{_f2(r['before_over_after_on'])} | {_f2(r['on_over_off'])} |")
    lines += ["", "CPU time per step (ms; this script on both trees):", "",
              "| layout | before (accounting always on) | after, off | after, on | before / after(off) | before / after(on) | "
              "on / off |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {_f1(r['cpu_before_ms'])} | {_f1(r['cpu_after_off_ms'])} | {_f1(r['cpu_after_on_ms'])} | "
                     f"{_f2(r['cpu_before_over_after_off'])} | {_f2(r['cpu_before_over_after_on'])} | {_f2(r['cpu_on_over_off'])} |")
    lines += ["", "Best step (ms; the fastest step of all rounds, slowest rank; this script on both trees — other jobs "
              "only add time, so this is the least noisy figure here):", "",
              "| layout | wall before | wall after off | wall after on | before / after(off) | before / after(on) | on / off | "
              "CPU before | CPU after off | CPU after on | before / after(off) | before / after(on) | on / off |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for what in ("wall", "cpu"):
            b, off, on = (r["best_ms"][f"{what}_{v}"] for v in ("before_always on", "after_off", "after_on"))
            cells += [_f1(b), _f1(off), _f1(on), _f2(_ratio(b, off)), _f2(_ratio(b, on)), _f2(_ratio(on, off))]
        lines.append(f"| {r['layout']} | " + " | ".join(cells) + " |")
    return lines


# --- the weak/strong scaling study (default) -----------------------------------------------------
def _model_info(trainer) -> dict:
    """What the analytic volumes need from a built run: unit parameter shapes, sizes, this rank's stages."""
    from meshweave.models.llama.model import Transformer

    cfg = trainer.p.cfg
    full = Transformer(cfg.model) if cfg.model.kind == "llama" else None

    def shapes(module):
        return [tuple(p.shape) for p in module.parameters(recurse=False)]

    units = None
    if full is not None:
        units = {"emb": shapes(full.tok_embeddings), "head": shapes(full.norm) + shapes(full.output),
                 "blocks": [[sh for m in block.modules() for sh in shapes(m)] for block in full.layers.values()]}
    stages = getattr(trainer.p.runner, "stages", [])
    ids = [st.stage_index for st in stages]
    n_stages = stages[0].num_stages if stages else 1
    from meshweave.parallel.pipeline_split import split_even

    layers = sum(len(split_even(cfg.model.n_layers, n_stages)[i]) for i in (ids or [0]))
    return {"units": units, "local_rows": cfg.train.global_batch // trainer.p.mesh.dims.dp, "seq_len": cfg.train.seq_len,
            "dim": cfg.model.dim, "n_layers": cfg.model.n_layers, "n_kv_heads": cfg.model.n_kv_heads,
            "head_dim": cfg.model.dim // cfg.model.n_heads, "stage_ids": ids, "n_stages": n_stages,
            "layers_of_rank": layers, "document_masking": cfg.data.document_masking}


def _measure_study(runs: list[list[str]], steps: int, warmup: int) -> list[dict]:
    """Each run (config overrides) in turn on this rank: build, warm up, time `steps` steps with the ledger on."""
    torch.set_num_threads(1)
    from meshweave.models.registry import model_spec

    out = []
    for overrides in runs:
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = load_config(None, [f"train.steps={steps + warmup}", f"run_dir={run_dir}", "logging.jsonl=false",
                                     "logging.comm_accounting=true", *overrides])
            trainer = build_trainer(cfg)
            times, cpu, ledger = _timed_steps(trainer, steps, warmup)
            info = _model_info(trainer)
            trainer.p.mesh.close()
        tokens = cfg.train.global_batch * cfg.train.seq_len
        out.append({"times": times, "cpu": cpu, "ledger": ledger, "info": info, "tokens": tokens,
                    "flops_per_token": model_spec(cfg.model.kind).flops_per_token(cfg.model, cfg.train.seq_len)})
    return out


def default_procs() -> list[int]:
    cores = os.cpu_count() or 2
    return [n for n in (1, 2, 4) if n <= max(2, cores)]


def study_runs(procs: list[int], base: list[str]) -> tuple[list[dict], list[str]]:
    """The (layout, mode) runs that fit, and one line per layout left out (the config check's reason)."""
    from meshweave.train.config import ConfigError
    from meshweave.train.validate import check

    base_cfg = load_config(None, base)
    seq, batch = base_cfg.train.seq_len, base_cfg.train.global_batch
    runs, skipped = [], []
    for key, world, degrees in model.layouts(procs):
        for mode in ("strong", "weak") if world > 1 else ("both",):
            sets = [*base, *model.overrides(degrees, mode, world, seq, batch)]
            try:
                check(load_config(None, sets), world)
            except ConfigError as err:
                skipped.append(f"{key} ({mode}): {err}")
                continue
            runs.append({"key": key, "world": world, "degrees": degrees, "mode": mode, "overrides": sets})
    return runs, skipped


def run_study(args: argparse.Namespace) -> None:
    procs = sorted(set(args.procs or default_procs()))
    if 1 not in procs:
        procs = [1, *procs]  # the baseline of every ratio
    steps = args.steps or (2 if args.quick else 5)
    warmup = 1
    base = model.QUICK_MODEL if args.quick else model.FULL_MODEL
    runs, skipped = study_runs(procs, base)
    started = time.perf_counter()
    results: dict[int, list[dict]] = {}
    for world in sorted({r["world"] for r in runs}):
        mine = [r for r in runs if r["world"] == world]
        names = ", ".join(f"{r['key']} {r['mode']}" for r in mine)
        print(f"{world} process(es): {names}", flush=True)
        per_rank = run_distributed(_measure_study, world, [r["overrides"] for r in mine], steps, warmup, timeout=900)
        for i, run in enumerate(mine):
            ranks = [res[i] for res in per_rank]
            # a step takes as long as its slowest rank
            run["step_times"] = [max(ts) for ts in zip(*(x["times"] for x in ranks))]
            run["rank_times"] = [x["times"] for x in ranks]
            run["rank_cpu"] = [x["cpu"] for x in ranks]
            run["cpu_step_times"] = [max(ts) for ts in zip(*run["rank_cpu"])]
            run["ledgers"] = [x["ledger"] for x in ranks]
            run["infos"] = [x["info"] for x in ranks]
            run["tokens"], run["flops_per_token"] = ranks[0]["tokens"], ranks[0]["flops_per_token"]
    close_all_pools()
    rows = study_rows(runs, steps)
    cluster = model.Cluster(peak_tflops=args.peak_tflops, mfu=args.mfu, intra_gbps=args.intra_gbps,
                            inter_gbps=args.inter_gbps)
    report = {"steps": steps, "warmup": warmup, "quick": args.quick, "procs": procs, "base_overrides": base,
              "skipped": skipped, "rows": rows, "wall_s": time.perf_counter() - started,
              "load_average": os.getloadavg(), "cluster": dataclasses.asdict(cluster)}
    report["calibration"] = model.calibrate(rows, os.cpu_count() or 1)
    report["projection"] = projection(rows, cluster, args.project_tokens_per_gpu)
    write_study(report, Path(args.out))


def study_rows(runs: list[dict], steps: int) -> list[dict]:
    """One row per (layout, mode): raw times and ledgers kept, bytes per dimension measured and analytic
    (the worst rank), and the ratios (model.ratios) computed from the step times."""
    rows = []
    for run in runs:
        modes = ("strong", "weak") if run["mode"] == "both" else (run["mode"],)
        per_rank_measured = [model.bytes_by_dim(ledger, steps) for ledger in run["ledgers"]]
        per_rank_analytic = [model.analytic_bytes(info, run["degrees"]) for info in run["infos"]]
        for mode in modes:
            rows.append({
                "key": run["key"], "world": run["world"], "degrees": run["degrees"], "mode": mode,
                "overrides": run["overrides"], "step_times": run["step_times"], "rank_times": run["rank_times"],
                "step_s": min(run["step_times"]), "tokens": run["tokens"],
                "rank_cpu": run["rank_cpu"], "cpu_step_times": run["cpu_step_times"],
                "cpu_step_s": min(run["cpu_step_times"]),
                "flops_per_token": run["flops_per_token"], "ledgers": run["ledgers"], "infos": run["infos"],
                "bytes": per_rank_measured, "bytes_analytic": per_rank_analytic,
            })
    model.ratios(rows)
    return rows


def projection(rows: list[dict], cluster, tokens_per_gpu: int) -> dict:
    """Projected GPU-cluster figures (compute calibrated by the 1-process run; links assumed)."""
    base = next(r for r in rows if r["world"] == 1 and r["mode"] == "strong")
    c_cpu = base["cpu_step_s"] / base["tokens"]  # CPU time: what the step's compute cost here, load aside
    c_gpu = model.gpu_seconds_per_token(base["flops_per_token"], cluster)
    inputs = {"measured_cpu_s_per_token": c_cpu, "flops_per_token": base["flops_per_token"],
              "measured_cpu_tflops": base["flops_per_token"] / c_cpu / 1e12, "gpu_s_per_token": c_gpu,
              "assumed_tokens_per_gpu_fsdp": tokens_per_gpu,
              **{f"assumed_{k}": v for k, v in dataclasses.asdict(cluster).items()}}
    layouts = []
    for r in rows:
        tokens_per_rank = r["tokens"] / (r["degrees"].get("dp", 1) * r["degrees"].get("sp", 1)
                                         * r["degrees"].get("tp", 1) * r["degrees"].get("pp", 1)) if r["world"] > 1 \
            else r["tokens"]
        compute = tokens_per_rank * c_gpu
        comm = max(model.projected_comm_seconds(ledger, len(r["step_times"]), r["degrees"], r["world"], cluster)
                   for ledger in r["ledgers"])
        layouts.append({"key": r["key"], "mode": r["mode"], "world": r["world"], "compute_s": compute, "comm_s": comm,
                        "step_s": compute + comm, "tokens": r["tokens"]})
    one = {lay["mode"]: lay for lay in layouts if lay["world"] == 1}
    for lay in layouts:
        b = one[lay["mode"]]
        lay["efficiency"] = (lay["tokens"] / lay["step_s"]) / (lay["world"] * b["tokens"] / b["step_s"])
    info = base["infos"][0]
    dp = model.project_dp_weak(info, tokens_per_gpu, base["flops_per_token"], [8, 64, 512, 1024], cluster) \
        if info["units"] else []
    return {"inputs": inputs, "layouts": layouts, "fsdp_weak": dp}


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x / 1e6:.3f}"


def write_study(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rows, proj = report["rows"], report["projection"]
    lines = ["# Weak and strong scaling (real trainer; measured on this machine)", "",
             f"{report['steps']} timed steps per run after {report['warmup']} warm-up; a step = its slowest rank; "
             f"ms/step is the best step of the run (other jobs on a shared machine only add time, so the fastest "
             f"step is the least noisy figure; all step times are in the JSON). Comm accounting on in every run (its cost is in the times). Load average at "
             f"the end {'/'.join(f'{x:.1f}' for x in os.getloadavg())}; base config overrides: "
             f"`{' '.join(report['base_overrides']) or '(default)'}`.", "",
             "Strong: same global batch and sequence; speed-up = T1 / Tn, efficiency = speed-up / n. Weak: n times the "
             "work (sequence x n for sp, global batch x n otherwise); efficiency = (tokens/s) / (n x tokens/s of one "
             "process). Bytes: per rank per step from the comm ledger (max over ranks) vs the analytic volume "
             "(bench_scaling_model.py).", "",
             "CPU columns: the same ratios from each rank's process CPU time per step (slowest rank): on a loaded "
             "machine a job with more processes also gets more CPU shares, so wall-clock efficiency can exceed 1; the CPU "
             "figures do not see that (nor time spent waiting for peers).", "",
             "| layout | mode | procs | ms/step | tokens/step | speed-up | efficiency | CPU ms/step | CPU efficiency | dim | "
             "MB measured | MB analytic | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dims = [d for d in model.DIMS if r["degrees"].get(d, 1) > 1] or ["-"]
        for i, d in enumerate(dims):
            meas = max(b[d] for b in r["bytes"]) if d != "-" else None
            ana = [a[d] for a in r["bytes_analytic"]] if d != "-" else [None]
            ana_v = None if any(a is None for a in ana) else max(ana)
            ratio = f"{meas / ana_v:.3f}" if meas and ana_v else ("" if d == "-" else "n/a")
            first = i == 0
            lines.append(f"| {r['key'] if first else ''} | {r['mode'] if first else ''} | {r['world'] if first else ''} | "
                         f"{r['step_s'] * 1e3:.1f} | {r['tokens']} | {r['speedup']:.2f} | {r['efficiency']:.2f} | "
                         f"{r['cpu_step_s'] * 1e3:.1f} | {r['cpu_efficiency']:.2f} | {d} | "
                         f"{_mb(meas) if d != '-' else ''} | {_mb(ana_v) if d != '-' else ''} | {ratio} |")
    if report["skipped"]:
        lines += ["", "Layouts that do not fit (left out):", ""] + [f"- {s}" for s in report["skipped"]]
    lines += calibration_lines(report["calibration"])
    inp = proj["inputs"]
    lines += ["", "## Projected to a GPU cluster (projected, not measured)", "",
              f"Inputs: measured compute time per token here (1 process, CPU time) {inp['measured_cpu_s_per_token'] * 1e6:.1f} us "
              f"({inp['measured_cpu_tflops'] * 1e3:.2f} GFLOP/s achieved at {inp['flops_per_token'] / 1e6:.2f} MFLOP/token); "
              f"projected GPU compute per token {inp['gpu_s_per_token'] * 1e9:.3f} ns = FLOPs / (assumed peak "
              f"{inp['assumed_peak_tflops']:.0f} TFLOP/s x assumed MFU {inp['assumed_mfu']:.2f}); assumed links: intra-node "
              f"{inp['assumed_intra_gbps']:.0f} GB/s, {inp['assumed_intra_latency_us']:.0f} us; inter-node "
              f"{inp['assumed_inter_gbps']:.0f} GB/s, {inp['assumed_inter_latency_us']:.0f} us; "
              f"{inp['assumed_gpus_per_node']} GPUs per node; ring collectives on this run's ledger; no overlap.", "",
              "The measured layouts with this run's batch (a tiny batch: latency dominates):", "",
              "| layout | mode | GPUs | projected compute ms | projected comm ms | projected step ms | projected efficiency |",
              "|---|---|---|---|---|---|---|"]
    for lay in proj["layouts"]:
        lines.append(f"| {lay['key']} | {lay['mode']} | {lay['world']} | {lay['compute_s'] * 1e3:.4f} | "
                     f"{lay['comm_s'] * 1e3:.4f} | {lay['step_s'] * 1e3:.4f} | {lay['efficiency']:.2f} (projected) |")
    if proj["fsdp_weak"]:
        lines += ["", f"Pure FSDP weak scaling of this model (projected; assumed {inp['assumed_tokens_per_gpu_fsdp']} tokens "
                  "per GPU per step, analytic FSDP volume, no overlap):", "",
                  "| GPUs | link | projected compute ms | projected comm ms | projected efficiency |", "|---|---|---|---|---|"]
        for p in proj["fsdp_weak"]:
            lines.append(f"| {p['gpus']} | {p['link']} | {p['compute_s'] * 1e3:.4f} | {p['comm_s'] * 1e3:.4f} | "
                         f"{p['efficiency']:.2f} (projected) |")
    lines += ["", f"Command: `python benchmarks/bench_scaling.py {' '.join(sys.argv[1:])}`; wall {report['wall_s']:.0f} s.", ""]
    (out / "scaling.md").write_text("\n".join(lines))
    (out / "scaling.json").write_text(json.dumps(report, indent=1))
    print("\n".join(lines))
    plot_study(report, out / "scaling.png")


def calibration_lines(cal: dict) -> list[str]:
    """The cost model fitted to this run (bench_scaling_model.calibrate): its figures, and each run's fit."""
    bw = "n/a (no byte term fitted)" if cal["bytes_per_s"] == float("inf") else f"{cal['bytes_per_s'] / 1e9:.3f} GB/s"
    lines = ["", "## The cost model, calibrated on this run", "",
             (f"step = overhead + work x c + link bytes / B + latencies x L, fitted to every measured run (non-negative "
              f"least squares; work = tokens per process x max(1, processes / {cal['cores']} cores)): overhead "
              f"{cal['overhead_s'] * 1e3:.2f} ms, c {cal['s_per_token'] * 1e6:.2f} us/token, B {bw}, L "
              f"{cal['latency_s'] * 1e6:.1f} us. Mean |model / measured - 1| = {cal['mean_abs_error']:.1%}: how far this "
              "form explains this machine. The projection below keeps the form with the GPU cluster's c, B and L."), "",
             "| layout | mode | procs | measured ms/step | model ms/step | model / measured - 1 |", "|---|---|---|---|---|---|"]
    lines += [f"| {t['key']} | {t['mode']} | {t['world']} | {t['measured_s'] * 1e3:.1f} | {t['model_s'] * 1e3:.1f} | "
              f"{t['error']:+.1%} |" for t in cal["rows"]]
    return lines


def plot_study(report: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot written")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, mode in zip(axes, ("strong", "weak")):
        rows = [r for r in report["rows"] if r["mode"] == mode]
        ax.bar([f"{r['key']}" for r in rows], [r["efficiency"] for r in rows], color="tab:blue", label="measured")
        proj = {p["key"]: p["efficiency"] for p in report["projection"]["layouts"] if p["mode"] == mode}
        ax.plot([r["key"] for r in rows], [proj[r["key"]] for r in rows], "o", color="tab:orange",
                label="projected (GPU cluster)")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set_title(f"{mode} scaling efficiency")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)



if __name__ == "__main__":
    main()
