"""DSP vs Ulysses (generic and frames-sharded) and ring on the same st_dit model, side by side on CPU (gloo) processes.

For each SP degree P and video size (frames x latent height = width), one pooled distributed run builds the same
fp32 st_dit model and batch on every rank and times a forward+backward (median over repetitions, slowest rank,
methods interleaved so all see the same background load) of:
- dsp: activations sharded on the frames during spatial blocks and on the patches during temporal blocks, one
  all-to-all per switch (attention/dsp.py);
- ulysses: sp_method ulysses, Ulysses as a generic runtime applies it (the baseline of the DSP paper): the
  flattened tokens sharded, every attention (spatial and temporal) all-to-alls q, k, v to head shards and the
  output back (attention/flattened_ulysses.py);
- ulysses (frames sharded): the stronger embedded baseline, frames sharded throughout and Ulysses inside the
  temporal attention only (attention/embedded_sp.py, installed directly);
- ring: sp_method ring, the frames-sharded layout with ring attention (K/V passed around) in the temporal attention;
- one process: the whole batch in one process with P threads (the same total cores as P processes x 1 thread),
  timed alone (not while the SP ranks wait, which would share its cores), and with one thread.
It reports step time, efficiency against one process (T_1 / T_P), payload bytes per rank per step from the
CommLedger (all-to-all; for ring, bytes sent) next to the analytic formula, DSP's byte ratio to each, and peak memory where
it can be measured (CUDA: max_memory_allocated; on CPU "n/a", since per-method peaks are not separable in one process).

On this machine the P processes share 2 cores, so efficiency is bounded by about 2/P; the honest figures are the
ratios between methods in the same run and the exact byte counts.

    python benchmarks/bench_dsp.py --quick        # P = 2, two sizes: a few minutes on a loaded 2-core machine
    python benchmarks/bench_dsp.py                # P in {2, 4}, four sizes
    python benchmarks/bench_dsp.py --bytes-only   # P in {2, 4}, four sizes: one step each, bytes and formulas only

Writes benchmarks/results/dsp.{md,json,png} (--quick: dsp_quick.*; --bytes-only: dsp_bytes.md, .json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from meshweave.attention.dsp import DynamicSequenceParallel, plan_switches  # noqa: E402
from meshweave.attention.dsp_comm import chunk_length  # noqa: E402
from meshweave.attention.embedded_sp import EmbeddedLayout, factorised_ring, factorised_ulysses  # noqa: E402
from meshweave.attention.flattened_ulysses import FlattenedUlysses  # noqa: E402
from meshweave.core.comm import CommGroup, CommLedger  # noqa: E402
from meshweave.models.attention_api import install_ops, local_attention  # noqa: E402
from meshweave.models.layout_api import layout_slots  # noqa: E402
from meshweave.models.registry import model_spec  # noqa: E402
from meshweave.models.st_dit.parts import velocity_mse_sum  # noqa: E402
from meshweave.testing import close_all_pools, run_distributed  # noqa: E402
from meshweave.train.config import load_config  # noqa: E402

RESULTS = Path(os.environ.get("MESHWEAVE_BENCH_OUT") or REPO / "benchmarks" / "results")  # `meshweave bench --out`
METHODS = ("dsp", "ulysses", "ulysses_frames", "ring")
LABELS = {"dsp": "dsp", "ulysses": "ulysses", "ulysses_frames": "ulysses (frames sharded)", "ring": "ring"}
MODEL = ["model.kind=st_dit", "model.channels=4", "model.patch=2", "model.dim=128", "model.n_heads=4",
         "model.n_layers=2"]


def _config(frames: int, size: int):
    return load_config(None, MODEL + [f"model.frames={frames}", f"model.height={size}", f"model.width={size}"]).model


def _install(model, method: str, group: CommGroup) -> None:
    """What parallel/sequence.py installs for sp_method dsp / ulysses / ring, plus the frames-sharded Ulysses."""
    if method == "ulysses":
        layout = FlattenedUlysses(group)
        ops = {kind: layout.attention(kind) for kind in ("spatial", "temporal")}
    else:
        layout = DynamicSequenceParallel(group) if method == "dsp" else EmbeddedLayout(group, 1)
        op = {"ulysses_frames": factorised_ulysses, "ring": factorised_ring}.get(method, lambda g: local_attention)(group)
        ops = {"spatial": op, "temporal": op}
    for slot in layout_slots(model):
        slot.op = layout
    install_ops(model, ops)


def _step(model, batch) -> None:
    noisy, t, velocity = batch
    velocity_mse_sum(model(noisy, t), velocity).backward()


def _timed(fn, group: CommGroup | None) -> float:
    if group is not None:
        dist.barrier(group.pg)
    start = time.perf_counter()
    fn()
    took = torch.tensor([time.perf_counter() - start])
    if group is not None:
        dist.all_reduce(took, op=dist.ReduceOp.MAX, group=group.pg)
    return float(took)


def bench_task(sizes: list[tuple[int, int]], batch: int, reps: int) -> list[dict]:
    """On every rank: per size, the median fwd+bwd time of each method, its bytes, and one process's time."""
    ranks = list(range(dist.get_world_size()))
    p = len(ranks)
    group = CommGroup("sp", dist.new_group(ranks), ranks, CommLedger())
    rows = []
    for frames, size in sizes:
        cfg = _config(frames, size)
        torch.manual_seed(0)
        models = {m: model_spec("st_dit").build(cfg) for m in METHODS}
        g = torch.Generator().manual_seed(1)
        shape = (batch, frames, cfg.channels, size, size)
        data = (torch.randn(shape, generator=g), torch.rand(batch, generator=g), torch.randn(shape, generator=g))
        for m in METHODS:
            _install(models[m], m, group)
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        traffic: dict[str, int] = {}
        for rep in range(reps + 1):  # the first round warms up
            for m in METHODS:
                group.ledger.reset()
                took = _timed(lambda: _step(models[m], data), group)
                traffic[m] = group.ledger.bytes(op="send" if m == "ring" else "all_to_all")
                if rep:
                    times[m].append(took)
            dist.barrier(group.pg)
        row = {"P": p, "frames": frames, "size": size, "tokens": frames * cfg.tokens_per_frame, "batch": batch}
        for m, ts in times.items():
            row[f"{m} s"] = statistics.median(ts) if ts else None
            if m in traffic:
                row[f"{m} bytes"], row[f"{m} formula"] = traffic[m], expected_bytes(m, cfg, batch, p)
        rows.append(row)
    return rows


def one_process_task(sizes: list[tuple[int, int]], batch: int, reps: int, threads: int) -> list[float]:
    """Median fwd+bwd time of the whole model on one process with `threads` threads (the P ranks' cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = []
        for frames, size in sizes:
            cfg = _config(frames, size)
            torch.manual_seed(0)
            model = model_spec("st_dit").build(cfg)
            g = torch.Generator().manual_seed(1)
            shape = (batch, frames, cfg.channels, size, size)
            data = (torch.randn(shape, generator=g), torch.rand(batch, generator=g), torch.randn(shape, generator=g))
            ts = [_timed(lambda: _step(model, data), None) for _ in range(reps + 1)][1:]
            out.append(statistics.median(ts))
        return out
    finally:
        torch.set_num_threads(before)


def expected_bytes(method: str, cfg, batch: int, p: int) -> int:
    """Payload per rank per fwd+bwd (fp32): DSP's switches of the padded activations; generic Ulysses' 8 all-to-alls
    of q/k/v/output (padded flattened tokens and heads) per attention, spatial and temporal; the frames-sharded
    Ulysses' 8 (padded frames and heads) per temporal block; ring's bytes sent."""
    t, s, d, h = cfg.frames, cfg.tokens_per_frame, cfg.dim, cfg.n_heads
    if method == "dsp":
        switches = plan_switches((batch, t, s), (2, 1) * cfg.n_layers, p)
        return 2 * switches * batch * chunk_length(t, p) * chunk_length(s, p) * p * d * 4
    if method == "ulysses":
        return 2 * cfg.n_layers * 8 * batch * chunk_length(t * s, p) * p * chunk_length(h, p) * (d // h) * 4
    if t == 1:
        return 0
    if method == "ring":  # K and V stacked, P-1 shifts each way per temporal block (bytes sent)
        return cfg.n_layers * 4 * (p - 1) * batch * s * chunk_length(t, p) * d * 4
    return cfg.n_layers * 8 * batch * s * chunk_length(t, p) * p * chunk_length(h, p) * (d // h) * 4


def write_report(rows: list[dict], stem: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    timed = rows[0].get("one process s") is not None
    others = METHODS[1:]
    lines = ["# DSP vs Ulysses (generic and frames-sharded) and ring on st_dit (CPU, gloo)", "",
             "Bytes: payload per rank per fwd+bwd step from the ledger (all-to-all; ring: bytes sent), the analytic "
             "formula in brackets. ulysses = sp_method ulysses as a generic runtime applies it (flattened tokens "
             "sharded, all-to-alls in every attention); ulysses (frames sharded) = Ulysses in the temporal "
             "attention only (the stronger, model-aware baseline); ring = sp_method ring (frames sharded)."]
    if timed:
        lines += ["", "fwd+bwd of the whole model, median over repetitions, slowest rank. Efficiency = one process on "
                  "the same total cores / P processes."]
    head = ["P", "frames x latent", "tokens"]
    if timed:
        head += [f"{LABELS[m]} s" for m in METHODS] + ["one process s", "one thread s"]
        head += [f"{LABELS[m]} eff." for m in METHODS]
    head += [f"{LABELS[m]} bytes" for m in METHODS] + [f"dsp / {LABELS[m]}" for m in others]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["P"]), f"{r['frames']} x {r['size']}²", str(r["tokens"])]
        if timed:
            cells += [f"{r[f'{m} s']:.3f}" for m in METHODS] + [f"{r['one process s']:.3f}", f"{r['one thread s']:.3f}"]
            cells += [f"{r['one process s'] / r[f'{m} s']:.2f}" for m in METHODS]
        cells += [f"{r[f'{m} bytes']:,} ({r[f'{m} formula']:,})" for m in METHODS]
        cells += [f"{r['dsp bytes'] / r[f'{m} bytes']:.3f}" if r[f"{m} bytes"] else "n/a" for m in others]
        lines.append("| " + " | ".join(cells) + " |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines += ["", f"Machine: {os.cpu_count()} cores, load average {load:.1f} when written; the byte counts are exact "
              f"whatever the load."]
    if timed:
        lines += ["Peak memory: n/a on CPU (run on CUDA for max_memory_allocated). On a loaded machine one process "
                  "with P threads suffers most (its threads wait for each other), which inflates the efficiency column."]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines + [""]))
    if timed:
        _plot(rows, stem)
    print("\n".join(lines))


def _plot(rows: list[dict], stem: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"P{r['P']} {r['frames']}x{r['size']}" for r in rows]
    x = range(len(rows))
    for i, m in enumerate((*METHODS, "one process")):
        label = LABELS.get(m, m)
        axes[0].bar([v + 0.16 * (i - 2) for v in x], [r[f"{m} s"] for r in rows], width=0.16, label=label)
        if m in METHODS:
            axes[1].bar([v + 0.2 * (i - 1.5) for v in x], [r[f"{m} bytes"] / 2**20 for r in rows], width=0.2, label=label)
    for ax, title in zip(axes, ("fwd+bwd time (s)", "MiB sent per rank per step")):
        ax.set_xticks(list(x), labels, rotation=30)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--bytes-only", action="store_true", help="one untimed step per method: bytes and formulas")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    degrees = [2] if args.quick else [2, 4]
    sizes = [(8, 16), (16, 16)] if args.quick else [(8, 16), (16, 16), (16, 32), (1, 64)]
    reps = 0 if args.bytes_only else args.reps
    rows = []
    try:
        for p in degrees:
            got = run_distributed(bench_task, p, sizes, args.batch, reps, timeout=3600)[0]
            if args.bytes_only:
                rows += got
                continue
            single = run_distributed(one_process_task, 1, sizes, args.batch, args.reps, p, timeout=3600)[0]
            serial = run_distributed(one_process_task, 1, sizes, args.batch, args.reps, 1, timeout=3600)[0]
            rows += [{**row, "one process s": t, "one thread s": t1} for row, t, t1 in zip(got, single, serial)]
    finally:
        close_all_pools()
    write_report(rows, "dsp_bytes" if args.bytes_only else "dsp_quick" if args.quick else "dsp")


if __name__ == "__main__":
    main()
