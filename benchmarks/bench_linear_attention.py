"""LASP-2 vs the LASP-1 chain vs softmax ring attention, side by side on CPU (gloo) processes.

For each SP degree P and sequence length N, one pooled distributed run times, on the same inputs (B=1, causal,
fp32, per-head decay for the linear methods):
- lasp2: meshweave's LASP-2 (one all-gather of memory states each way; contiguous layout);
- lasp2 (zigzag): the same in the ring layout (two segments per rank: twice the state bytes), as a hybrid
  model whose softmax layers use ring runs it;
- lasp1 chain: the same math with the states passed rank to rank over P-1 sequential hops (LASP-1);
- ring (softmax): meshweave's zigzag ring attention, the softmax layer a linear layer replaces (up to
  --ring-max tokens: it is quadratic in N);
- lasp2h (softmax): LASP-2H's softmax half, one all-gather of K/V in the zigzag layout (same N limit), the
  alternative to ring for the softmax layers of a hybrid.
It reports forward+backward and forward wall time (median over repetitions, slowest rank, repetitions interleaved
across methods so all see the same background load), efficiency against one process running the whole sequence
on the same workers (T_1 / (P * T_P); the linear methods against the single-process chunked kernel, ring against
single-process SDPA), ratios LASP-2 / peer, and payload bytes per rank from the CommLedger next to the analytic
formula. It also checks that LASP-2 and the LASP-1 chain return the same output.

On this machine the P processes share 2 cores, so efficiency is bounded by about 2/P; the honest figures are the
ratios between methods in the same run and the exact byte counts.

    python benchmarks/bench_linear_attention.py --quick      # N in {1024, 4096}, P = 2: a minute or two
    python benchmarks/bench_linear_attention.py              # N from 1K to 64K (ring to 8K), P in {2, 4}

Writes benchmarks/results/linear_attention.{md,json,png} (--quick: linear_attention_quick.*; --name: another stem).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from meshweave.attention import build_attention_op, shard_sequence  # noqa: E402
from meshweave.attention.lasp1 import lasp1_op  # noqa: E402
from meshweave.attention.lasp2 import LinearSequenceParallel, segment_layout  # noqa: E402
from meshweave.attention.lasp2h import AllGatherKVSequenceParallel  # noqa: E402
from meshweave.core.comm import CommGroup, CommLedger  # noqa: E402
from meshweave.models.attention_api import AttentionMeta, local_attention  # noqa: E402
from meshweave.models.linear_attention import head_log_decay, local_linear_attention  # noqa: E402
from meshweave.testing import close_all_pools, run_distributed  # noqa: E402

RESULTS = Path(os.environ.get("MESHWEAVE_BENCH_OUT") or REPO / "benchmarks" / "results")  # `meshweave bench --out`
LINEAR = ("lasp2", "lasp2 (zigzag)", "lasp1 chain")


def _time_once(fn, group=None) -> float:
    """Wall time of one call; with a `group`, its ranks start together and the slowest rank's time counts."""
    if group is not None:
        dist.barrier(group=group)
    t0 = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    if group is not None:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
    return elapsed.item()


def _runner(op, layout: str, full: dict, rank: int, size: int, log_decay, ledger: CommLedger | None):
    """Shard the inputs; return (forward, forward_backward, bytes and calls of one fwd+bwd, output shard)."""
    shard = (lambda x: shard_sequence(x, layout, rank, size, 1)) if size > 1 else (lambda x: x)
    q, k, v, dout = (shard(full[n]) for n in ("q", "k", "v", "dout"))
    call = (lambda *t: op(*t, AttentionMeta(causal=True), log_decay)) if log_decay is not None else \
        (lambda *t: op(*t, AttentionMeta(causal=True)))

    def forward():
        with torch.no_grad():
            return call(q, k, v)

    def forward_backward():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        call(qq, kk, vv).backward(dout)

    forward_backward()  # warm-up
    stats = {}
    if ledger is not None:
        ledger.reset()
        forward_backward()
        stats = dict(calls=ledger.calls(), by_op={f"{g}/{o}": {"calls": s.calls, "bytes": s.bytes} for (g, o), s in ledger.stats.items()})
    return forward, forward_backward, stats, forward()


def bench_task(seq_lens: list[int], heads: int, head_dim: int, reps: int, ring_max: int) -> list[dict]:
    """Runs on every rank: all methods at every sequence length. Returns rows (identical on every rank)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    ranks = list(range(size))
    pg = dist.new_group(ranks, timeout=timedelta(hours=2))  # rank 0 alone may run a long single-process reference
    sp = CommGroup("sp", pg, ranks, CommLedger())
    log_decay = head_log_decay("alibi", heads).float()
    methods = [("lasp2", "ulysses", LinearSequenceParallel(sp, "ulysses")),
               ("lasp2 (zigzag)", "ring", LinearSequenceParallel(sp, "ring")),
               ("lasp1 chain", "ulysses", lasp1_op(sp)),
               ("ring (softmax)", "ring", build_attention_op("ring", sp)),
               ("lasp2h (softmax)", "ring", AllGatherKVSequenceParallel(sp, "ring"))]
    rows = []
    for n in seq_lens:
        gen = torch.Generator().manual_seed(n)
        full = {name: torch.randn(1, n, heads, head_dim, generator=gen) for name in ("q", "k", "v", "dout")}
        single = {}
        if rank == 0:  # the whole sequence in one process (the others wait at the barrier)
            single["linear"] = _runner(local_linear_attention, "local", full, 0, 1, log_decay, None)
            if n <= ring_max:
                single["softmax"] = _runner(local_attention, "local", full, 0, 1, None, None)
        dist.barrier(group=pg)
        entries, outputs = [], {}
        for label, layout, op in methods:
            row = dict(P=size, N=n, method=label)
            softmax = label.endswith("(softmax)")
            if softmax and n > ring_max:
                row["note"] = f"skipped above --ring-max {ring_max} (quadratic in N)"
            else:
                fwd, fwdbwd, stats, out = _runner(op, layout, full, rank, size, None if softmax else log_decay,
                                                  sp.ledger)
                row.update(stats)
                outputs[label] = out
                entries.append((row, fwd, fwdbwd, [], []))
            rows.append(row)
        same = torch.allclose(outputs["lasp2"], outputs["lasp1 chain"], rtol=1e-4, atol=1e-4)
        single_t = {kind: ([], []) for kind in single}
        for _ in range(reps):  # interleaved rounds: every method sees the same background load
            for kind, (f, fb, _s, _o) in single.items():
                single_t[kind][0].append(_time_once(f))
                single_t[kind][1].append(_time_once(fb))
            dist.barrier(group=pg)
            for _row, f, fb, t_f, t_fb in entries:
                t_f.append(_time_once(f, pg))
                t_fb.append(_time_once(fb, pg))
        for row, _f, _fb, t_f, t_fb in entries:
            row["fwd"], row["fwdbwd"] = statistics.median(t_f), statistics.median(t_fb)
            row["lasp1_equals_lasp2"] = bool(same)
        medians = {kind: (statistics.median(a), statistics.median(b)) for kind, (a, b) in single_t.items()}
        box = [medians]
        dist.broadcast_object_list(box, src=0, group=pg)  # one-time report plumbing, not part of any timed call
        for row in rows[-len(methods):]:
            kind = "softmax" if row["method"].endswith("(softmax)") else "linear"
            if kind in box[0]:
                row["single_fwd"], row["single_fwdbwd"] = box[0][kind]
    dist.destroy_process_group(pg)
    return rows


# --- report ----------------------------------------------------------------------------------------------------
def expected_bytes(method: str, n: int, p: int, heads: int, d: int) -> tuple[int, int]:
    """(sent, received) payload of one fwd+bwd on the busiest rank, in the ledger's terms (B=1, fp32)."""
    state = heads * d * d * 4
    if method == "lasp1 chain":  # a middle rank sends and receives one state each way
        hops = min(2, p - 1)
        return hops * state, hops * state
    kv = 2 * heads * (n // p) * d * 4  # K and V of a rank's shard (fp32)
    if method.startswith("lasp2h"):  # all-gather K/V forward, reduce-scatter dK/dV of all P shards backward
        return kv + p * kv, 2 * (p - 1) * kv
    if method.startswith("lasp2"):  # one all-gather each way of this rank's states; it receives every other rank's
        sent = 2 * max(len(s) for s in segment_layout("ring" if "zigzag" in method else "ulysses", n, p, None)) * state
        return sent, (p - 1) * sent
    sent = (2 * (p - 1) + p) * kv  # ring: K/V per step; backward adds dK/dV (fp32)
    return sent, sent


def traffic(by_op: dict, p: int) -> tuple[int, int]:
    """(sent, received) from one rank's ledger: an all-gather receives (P-1) times what it hands in."""
    sent = sum(s["bytes"] for key, s in by_op.items() if not key.endswith("/recv"))
    received = sum(s["bytes"] for key, s in by_op.items() if key.endswith("/recv"))
    received += (p - 1) * sum(s["bytes"] for key, s in by_op.items() if key.endswith("/all_gather"))
    received += (p - 1) * sum(s["bytes"] for key, s in by_op.items() if key.endswith("/reduce_scatter")) // p
    return sent, received


def merge_ranks(per_rank: list[list[dict]]) -> list[dict]:
    """Rank 0's rows with the busiest rank's traffic (timings are already the slowest rank's)."""
    rows = []
    for i, row in enumerate(per_rank[0]):
        row = dict(row)
        if "by_op" in row:
            both = [traffic(ranks[i]["by_op"], row["P"]) for ranks in per_rank]
            row["sent"], row["received"] = max(s for s, _ in both), max(r for _, r in both)
        rows.append(row)
    return rows


def summarise(rows: list[dict]) -> dict:
    """Per P: the crossover length where LASP-2 beats ring, LASP-2's speed-up over the LASP-1 chain, and LASP-2H's
    all-gather-KV softmax against ring."""
    out = {}
    for p in sorted({r["P"] for r in rows}):
        t = {(r["method"], r["N"]): r.get("fwdbwd") for r in rows if r["P"] == p}
        lengths = sorted({r["N"] for r in rows if r["P"] == p})
        both = [n for n in lengths if t.get(("lasp2", n)) and t.get(("ring (softmax)", n))]
        wins = [n for n in both if t[("lasp2", n)] < t[("ring (softmax)", n)]]
        crossover = next((n for i, n in enumerate(both) if all(m in wins for m in both[i:])), None)
        out[p] = dict(
            crossover=crossover, measured=both,
            vs_ring={n: t[("ring (softmax)", n)] / t[("lasp2", n)] for n in both},
            vs_lasp1={n: t[("lasp1 chain", n)] / t[("lasp2", n)] for n in lengths if t.get(("lasp1 chain", n))},
            lasp2h_vs_ring={n: t[("ring (softmax)", n)] / t[("lasp2h (softmax)", n)] for n in both
                            if t.get(("lasp2h (softmax)", n))},
        )
    return out


def write_report(rows: list[dict], args, stem: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    lines = [
        "# Linear attention sequence parallelism on CPU (gloo): LASP-2 vs LASP-1 chain vs ring (and LASP-2H)",
        "",
        f"B=1, heads={args.heads}, head_dim={args.head_dim}, float32, causal; linear methods: alibi decay, chunk 64; "
        f"median of {args.reps} reps, slowest rank. Machine: {os.cpu_count()} cores shared by all P processes "
        f"(efficiency bound ~{os.cpu_count()}/P). torch {torch.__version__}. Load average (1/5/15 min) at the end: "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs share the machine: expect noise).",
        "",
        "eff = T_single / (P * T_P): the linear methods against the single-process chunked kernel, ring against "
        "single-process SDPA, both on rank 0 of the same pool with its threads. 'lasp2 speed-up' = method time / "
        "lasp2 time (> 1: LASP-2 is faster). Traffic of one fwd+bwd on the busiest rank, from the ledgers (sent = "
        "payload handed to calls; received = receives plus (P-1) x each all-gather's payload), next to the formula "
        "(lasp2: one all-gather each way of 1 (contiguous) or 2 (zigzag) H x d x d fp32 states, received from all "
        "P-1 peers; lasp1: one state per hop each way; ring: K/V of a shard per step, dK/dV in fp32; lasp2h: "
        "all-gather of K/V, reduce-scatter of dK/dV; both softmax methods grow with N).",
        "",
        "| P | N | method | fwd ms | fwd+bwd ms | eff fwd | eff fwd+bwd | lasp2 speed-up (fwd+bwd) | sent KiB | "
        "received KiB | formula sent / received KiB | calls | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lasp2 = {(r["P"], r["N"]): r.get("fwdbwd") for r in rows if r["method"] == "lasp2"}
    for r in rows:
        if "fwd" not in r:
            lines.append(f"| {r['P']} | {r['N']} | {r['method']} | | | | | | | | | | {r.get('note', '')} |")
            continue
        eff_f = f"{r['single_fwd'] / (r['P'] * r['fwd']):.2f}" if "single_fwd" in r else ""
        eff_b = f"{r['single_fwdbwd'] / (r['P'] * r['fwdbwd']):.2f}" if "single_fwdbwd" in r else ""
        speed = r["fwdbwd"] / lasp2[(r["P"], r["N"])]
        want_sent, want_received = expected_bytes(r["method"], r["N"], r["P"], args.heads, args.head_dim)
        note = "" if r.get("lasp1_equals_lasp2", True) else "LASP-1 and LASP-2 outputs differ!"
        if (r["sent"], r["received"]) != (want_sent, want_received):
            note += " ledger differs from the formula!"
        lines.append(
            f"| {r['P']} | {r['N']} | {r['method']} | {1e3 * r['fwd']:.1f} | {1e3 * r['fwdbwd']:.1f} | {eff_f} | "
            f"{eff_b} | {speed:.2f} | {r['sent'] / 1024:.0f} | {r['received'] / 1024:.0f} | "
            f"{want_sent / 1024:.0f} / {want_received / 1024:.0f} | {r['calls']} | {note.strip()} |")
    lines += ["", "Summary (fwd+bwd):", ""]
    for p, s in summary.items():
        cross = (f"LASP-2 is faster than ring from N = {s['crossover']} on (measured N: {s['measured']})"
                 if s["crossover"] else f"LASP-2 is not faster than ring at every N from some length on ({s['measured']})")
        ratios = ", ".join(f"{n}: {x:.2f}x" for n, x in s["vs_ring"].items())
        chain = ", ".join(f"{n}: {x:.2f}x" for n, x in s["vs_lasp1"].items())
        softmax = ", ".join(f"{n}: {x:.2f}x" for n, x in s["lasp2h_vs_ring"].items())
        lines += [f"- P={p}: {cross}; ring time / LASP-2 time: {ratios}.",
                  f"- P={p}: LASP-1 chain time / LASP-2 time: {chain}.",
                  f"- P={p} (softmax layers): ring time / LASP-2H all-gather-KV time: {softmax}."]
    lines += ["", f"Command: `{' '.join(['python', *sys.argv])}`", ""]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines))
    (RESULTS / f"{stem}.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1, default=str))
    _plot(rows, stem)
    print("\n".join(lines))


def _plot(rows: list[dict], stem: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG written (pip install matplotlib)")
        return
    ps = sorted({r["P"] for r in rows})
    fig, axes = plt.subplots(2, len(ps), figsize=(5.5 * len(ps), 8), squeeze=False)
    for col, p in enumerate(ps):
        sel = [r for r in rows if r["P"] == p and "fwdbwd" in r]
        for method in dict.fromkeys(r["method"] for r in sel):
            pts = [(r["N"], 1e3 * r["fwdbwd"], r["received"] / 1024) for r in sel if r["method"] == method]
            axes[0][col].plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", label=method)
            axes[1][col].plot([x for x, _, _ in pts], [b for _, _, b in pts], marker="o", label=method)
        single = sorted({(r["N"], 1e3 * r["single_fwdbwd"] / p) for r in sel if "single_fwdbwd" in r
                         and r["method"] == "lasp2"})
        if single:
            axes[0][col].plot(*zip(*single), "k--", label="single-process linear / P (ideal)")
        axes[0][col].set(title=f"fwd+bwd time, P={p}", xlabel="sequence length N", ylabel="ms", xscale="log",
                         yscale="log")
        axes[1][col].set(title=f"received per rank (fwd+bwd), P={p}", xlabel="sequence length N", ylabel="KiB",
                         xscale="log", yscale="log")
        for ax in axes[:, col]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N in {1024, 4096}, P = 2, 2 reps")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 65536])
    ap.add_argument("--sps", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ring-max", type=int, default=8192, help="longest N for softmax ring (quadratic)")
    ap.add_argument("--name", default="linear_attention", help="results file stem under benchmarks/results/")
    args = ap.parse_args()
    stem = args.name
    if args.quick:
        args.seq_lens, args.sps, args.reps, stem = [1024, 4096], [2], 2, "linear_attention_quick"
    from benchmarks.bench_linear_attention import bench_task as task  # workers import it by module name

    rows = []
    try:
        for p in args.sps:
            rows += merge_ranks(run_distributed(task, p, args.seq_lens, args.heads, args.head_dim, args.reps,
                                                args.ring_max, timeout=3600))
    finally:
        close_all_pools()
    write_report(rows, args, stem)


if __name__ == "__main__":
    main()
