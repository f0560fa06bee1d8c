"""Sequence-parallel attention side by side on CPU (gloo) processes: meshweave methods and peers.

For each SP degree P and sequence length N, one pooled distributed run times every method on the
same inputs (B=1, causal, fp32 by default):
- meshweave: ulysses, ring (zigzag), tokenring, usp (ulysses=2 when P >= 4);
- peers: DeepSpeed-Ulysses `DistributedAttention` (if deepspeed imports), torch's private ring
  template `_templated_ring_attention` driven by the CPU flash op (its round-robin load balancer
  on the same zigzag layout), and a naive all-gather-K/V baseline (llama3 / LASP-2H style).
It reports forward and forward+backward wall time (median over repetitions, slowest rank; the
repetitions are interleaved across methods so that all see the same background load),
efficiency against one process doing the whole sequence (T_1 / (P * T_P), measured on the same
workers with the same thread count), payload bytes per rank from the CommLedger (meshweave and the
all-gather baseline; the peers bypass it, so their bytes are given analytically or as n/a), and
peak RSS growth per rank during one forward+backward.

On this machine P processes share 2 cores, so efficiency is bounded by about 2/P; the honest
figures are the ratios between methods in the same run and the exact byte counts.

    python benchmarks/bench_attention.py --quick          # about a minute
    python benchmarks/bench_attention.py                  # N in {1024, 2048, 4096}, P in {2, 4}

Writes benchmarks/results/attention.{md,json,png}.
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
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from meshweave.attention import build_attention_op, shard_sequence, usp_rank_groups  # noqa: E402
from meshweave.attention.layout import shard_indices  # noqa: E402
from meshweave.core.comm import CommGroup, CommLedger  # noqa: E402
from meshweave.models.attention_api import AttentionMeta, local_attention  # noqa: E402
from meshweave.testing import close_all_pools, run_distributed  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


# --- peers ------------------------------------------------------------------------------------
class _AllGatherKV(torch.autograd.Function):
    """Naive baseline: all-gather K/V forward, reduce-scatter dK/dV backward (through a CommGroup)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return group.all_gather(x.contiguous(), dim=0)

    @staticmethod
    def backward(ctx, grad):
        return ctx.group.reduce_scatter(grad.contiguous(), dim=0), None


def naive_allgather_op(group: CommGroup):
    """Zigzag-sharded q attends to all-gathered K/V with an explicit causal mask (balanced work)."""

    def op(q, k, v, meta):
        p, s_local = group.size, q.shape[1]
        n = s_local * p
        kv = _AllGatherKV.apply(torch.stack([k, v]).movedim(2, 0), group)  # (P*S_local, 2, B, Hkv, D)
        order = torch.cat([shard_indices("ring", n, p, r) for r in range(p)])
        kv = kv[torch.argsort(order)].movedim(0, 2)  # back to sequence order
        qpos = shard_indices("ring", n, p, group.rank)
        mask = torch.arange(n)[None, :] <= qpos[:, None] if meta.causal else None
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), kv[0].transpose(1, 2), kv[1].transpose(1, 2), attn_mask=mask, enable_gqa=True
        )
        return out.transpose(1, 2)

    return op


def torch_ring_template_op(pg):
    """torch's private ring template with the CPU flash op (head-tail balancing = our zigzag)."""
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp  # private API

    fwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward

    class _Ring(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, causal):
            cp._cp_options.enable_load_balance = causal  # it refuses balancing for non-causal masks
            out, lse = cp._templated_ring_attention(pg, 2, fwd_op, q, k, v, is_causal=causal, dropout_p=0.0)[:2]
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.causal = causal
            return out

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            cp._cp_options.enable_load_balance = ctx.causal
            dq, dk, dv = cp._templated_ring_attention_backward(
                pg, 2, bwd_op, dout.contiguous(), "grad_out", q, k, v, out, lse, ctx.causal, dropout_p=0.0
            )[:3]
            return dq, dk, dv, None

    def op(q, k, v, meta):
        qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        return _Ring.apply(qt, kt, vt, meta.causal).transpose(1, 2)

    return op


def deepspeed_ulysses_op(pg):
    """DeepSpeed's DistributedAttention over SDPA (contiguous layout); raises if unavailable."""
    import deepspeed.comm as ds_comm
    from deepspeed.sequence.layer import DistributedAttention

    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)

    def local(q, k, v, *args, **kwargs):
        causal = kwargs.get("causal", True)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
        )
        return out.transpose(1, 2)

    da = DistributedAttention(local, pg, scatter_idx=2, gather_idx=1)

    def op(q, k, v, meta):
        return da(q, k, v, 0, causal=meta.causal)

    return op


# --- measurement ------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _time_once(fn, sync: bool) -> float:
    """Wall time of one call; with `sync`, ranks start together and the slowest rank's time counts."""
    if sync:
        dist.barrier()
    t0 = time.perf_counter()
    fn()
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    if sync:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def _prepare(op, layout: str, full: dict, causal: bool, rank: int, size: int, ledgers, u=None):
    """Shard the inputs, warm up, and measure bytes/calls/peak RSS of one fwd+bwd.

    Returns (forward, forward_backward, stats); timing happens later, interleaved across methods.
    """

    def shard(x):
        return shard_sequence(x, layout, rank, size, 1, u) if size > 1 else x

    q, k, v, dout = (shard(full[n]) for n in ("q", "k", "v", "dout"))
    meta = AttentionMeta(causal=causal)

    def forward():
        with torch.no_grad():
            op(q, k, v, meta)

    def forward_backward():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        op(qq, kk, vv, meta).backward(dout)

    forward_backward()  # warm-up (lazy inits, allocator)
    for ledger in ledgers:
        ledger.reset()
    base = _rss_mb()
    _reset_peak_rss()
    forward_backward()
    peak = max(0.0, _peak_rss_mb() - base)
    payload = sum(s.bytes for ledger in ledgers for (g, o), s in ledger.stats.items() if o != "recv")
    calls = sum(s.calls for ledger in ledgers for (g, o), s in ledger.stats.items() if o != "recv")
    return forward, forward_backward, dict(bytes=payload, calls=calls, peak_mb=peak)


def bench_task(seq_lens: list[int], heads: int, kv_heads_list: list[int], head_dim: int, causal: bool, reps: int, dtype: str) -> list[dict]:
    """Runs on every rank: all methods at every (kv heads, sequence length). Returns rank-0-style rows."""
    rank, size = dist.get_rank(), dist.get_world_size()
    ranks = list(range(size))
    pgs = [dist.new_group(ranks)]
    sp = CommGroup("sp", pgs[0], ranks, CommLedger())
    u = 2 if size >= 4 else None
    usp_groups = None
    if u:
        uly_l, ring_l = usp_rank_groups(ranks, u)
        uly_pg = [dist.new_group(r) for r in uly_l]
        ring_pg = [dist.new_group(r) for r in ring_l]
        pgs += uly_pg + ring_pg
        i = next(i for i, r in enumerate(uly_l) if rank in r)
        j = next(j for j, r in enumerate(ring_l) if rank in r)
        usp_groups = (CommGroup("ulysses", uly_pg[i], uly_l[i], CommLedger()), CommGroup("ring", ring_pg[j], ring_l[j], CommLedger()))
    methods: list[tuple[str, str, object, list, str | None]] = [
        ("ulysses", "ulysses", build_attention_op("ulysses", sp), [sp.ledger], None),
        ("ring", "ring", build_attention_op("ring", sp), [sp.ledger], None),
        ("tokenring", "tokenring", build_attention_op("tokenring", sp), [sp.ledger], None),
    ]
    if usp_groups:
        methods.append((f"usp(u={u})", "usp", build_attention_op("usp", ulysses_group=usp_groups[0], ring_group=usp_groups[1]),
                        [g.ledger for g in usp_groups], None))
    methods.append(("allgather-kv (naive)", "ring", naive_allgather_op(sp), [sp.ledger], None))
    try:
        methods.append(("torch ring template", "ring", torch_ring_template_op(pgs[0]), [], None))
    except Exception as err:  # noqa: BLE001 - private API may move
        methods.append(("torch ring template", "ring", None, [], f"unavailable: {type(err).__name__}: {err}"))
    try:
        methods.append(("deepspeed ulysses", "ulysses", deepspeed_ulysses_op(pgs[0]), [], None))
    except Exception as err:  # noqa: BLE001 - optional peer
        methods.append(("deepspeed ulysses", "ulysses", None, [], f"skipped: {type(err).__name__}: {err}"))
    dt = getattr(torch, dtype)
    rows = []
    for kv_heads, n in [(kv, n) for kv in kv_heads_list for n in seq_lens]:
        gen = torch.Generator().manual_seed(n)
        full = dict(
            q=torch.randn(1, n, heads, head_dim, generator=gen).to(dt),
            k=torch.randn(1, n, kv_heads, head_dim, generator=gen).to(dt),
            v=torch.randn(1, n, kv_heads, head_dim, generator=gen).to(dt),
            dout=torch.randn(1, n, heads, head_dim, generator=gen).to(dt),
        )
        # single-process reference: the whole sequence on rank 0 (the others wait at the barrier)
        single = _prepare(local_attention, "local", full, causal, 0, 1, []) if rank == 0 else None
        dist.barrier()
        entries, here = [], []
        for label, layout, op, ledgers, note in methods:
            row = dict(P=size, N=n, kv=kv_heads, method=label)
            if op is None:
                row["note"] = note
            else:
                try:
                    fwd, fwdbwd, stats = _prepare(op, layout, full, causal, rank, size, ledgers, u if layout == "usp" else None)
                    row.update(stats)
                    entries.append((row, fwd, fwdbwd, [], []))
                except Exception as err:  # noqa: BLE001 - a peer failing must not stop the run
                    row["note"] = f"failed: {type(err).__name__}: {str(err)[:120]}"
                    dist.barrier()
            here.append(row)
        # Interleaved rounds: every method (and the single process) sees the same background load.
        single_t: tuple[list, list] = ([], [])
        for _ in range(reps):
            if single is not None:
                single_t[0].append(_time_once(single[0], False))
                single_t[1].append(_time_once(single[1], False))
            dist.barrier()
            for _row, fwd, fwdbwd, t_f, t_fb in entries:
                t_f.append(_time_once(fwd, True))
                t_fb.append(_time_once(fwdbwd, True))
        for row, _f, _fb, t_f, t_fb in entries:
            row["fwd"], row["fwdbwd"] = statistics.median(t_f), statistics.median(t_fb)
        if single is not None:
            for row in here:
                row["single_fwd"], row["single_fwdbwd"] = statistics.median(single_t[0]), statistics.median(single_t[1])
        rows += here
    for pg in pgs:
        dist.destroy_process_group(pg)
    return rows


# --- report -----------------------------------------------------------------------------------
def analytic_bytes(method: str, p: int, n: int, heads: int, kv_heads: int, d: int, elem: int) -> int | None:
    """Per-rank payload (fwd+bwd) for peers that bypass the ledger, same terms as the ledger."""
    s = n // p
    if method == "deepspeed ulysses":
        h_kv = kv_heads if kv_heads % p == 0 else None
        return None if h_kv is None else 4 * s * (heads + h_kv) * d * elem  # 4 all-to-alls fwd, 4 bwd
    return None


def write_report(rows: list[dict], args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    elem = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    lines = [
        "# Sequence-parallel attention on CPU (gloo)",
        "",
        f"B=1, heads={args.heads}, kv_heads in {args.kv_heads}, head_dim={args.head_dim}, {args.dtype}, "
        f"{'causal' if not args.full_mask else 'full mask'}; median of {args.reps} reps, slowest rank. "
        f"Machine: {os.cpu_count()} cores shared by all P processes (efficiency bound ~{os.cpu_count()}/P). "
        f"torch {torch.__version__}. Load average (1/5/15 min) at the end of the run: "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs share the machine: expect noise).",
        "",
        "Efficiency = T_single / (P * T_P); 'vs ring' = meshweave ring time / method time (>1 is faster). "
        "Bytes = payload handed to communication calls per rank for one fwd+bwd (ledger; '~' analytic).",
        "",
        "| P | kv heads | N | method | fwd ms | fwd+bwd ms | eff fwd | eff fwd+bwd | vs ring (fwd+bwd) | MB/rank | calls | peak RSS MB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ring_time = {(r["P"], r["kv"], r["N"]): r.get("fwdbwd") for r in rows if r["method"] == "ring"}
    for r in rows:
        if "fwd" not in r:
            lines.append(f"| {r['P']} | {r['kv']} | {r['N']} | {r['method']} | | | | | | | | | {r.get('note', '')} |")
            continue
        eff_f = r["single_fwd"] / (r["P"] * r["fwd"])
        eff_b = r["single_fwdbwd"] / (r["P"] * r["fwdbwd"])
        vs = ring_time[(r["P"], r["kv"], r["N"])] / r["fwdbwd"]
        mb = r["bytes"] / 2**20 if r["bytes"] else None
        note = r.get("note", "")
        if mb is None:
            ab = analytic_bytes(r["method"], r["P"], r["N"], args.heads, r["kv"], args.head_dim, elem)
            mb_s = f"~{ab / 2**20:.2f}" if ab else "n/a"
        else:
            mb_s = f"{mb:.2f}"
        lines.append(
            f"| {r['P']} | {r['kv']} | {r['N']} | {r['method']} | {1e3 * r['fwd']:.1f} | {1e3 * r['fwdbwd']:.1f} | {eff_f:.2f} | "
            f"{eff_b:.2f} | {vs:.2f} | {mb_s} | {r['calls'] or ''} | {r['peak_mb']:.0f} | {note} |"
        )
    single = {(r["P"], r["kv"], r["N"]): (r["single_fwd"], r["single_fwdbwd"]) for r in rows if "single_fwd" in r}
    lines += ["", "Single process, whole sequence (measured on rank 0 of each P-process pool, others idle):", "",
              "| pool P | kv heads | N | fwd ms | fwd+bwd ms |", "|---|---|---|---|---|"]
    lines += [f"| {p} | {kv} | {n} | {1e3 * f:.1f} | {1e3 * b:.1f} |" for (p, kv, n), (f, b) in sorted(single.items())]
    lines += ["", f"Command: `{' '.join(['python', *sys.argv])}`", ""]
    (RESULTS / "attention.md").write_text("\n".join(lines))
    (RESULTS / "attention.json").write_text(json.dumps(rows, indent=1))
    _plot(rows)
    print("\n".join(lines))


def _plot(rows: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG written (pip install matplotlib)")
        return
    panels = sorted({(r["P"], r["kv"]) for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (p, kv) in zip(axes[0], panels):
        sel = [r for r in rows if r["P"] == p and r["kv"] == kv]
        for method in dict.fromkeys(r["method"] for r in sel):
            color = colors[list(dict.fromkeys(r["method"] for r in rows)).index(method) % len(colors)]
            pts = [(r["N"], 1e3 * r["fwdbwd"]) for r in sel if r["method"] == method and "fwdbwd" in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method, color=color)
        single = sorted({(r["N"], 1e3 * r["single_fwdbwd"] / p) for r in sel if "single_fwdbwd" in r})
        ax.plot(*zip(*single), "k--", label="single process / P (ideal)")
        ax.set(title=f"fwd+bwd, P={p}, kv heads={kv}", xlabel="sequence length", ylabel="ms", xscale="log", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "attention.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N in {512, 1024}, P in {2, 4}, 2 reps (about a minute)")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--sps", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--full-mask", action="store_true", help="non-causal attention")
    args = ap.parse_args()
    if args.quick:
        args.seq_lens, args.reps = [512, 1024], 2
    # the workers import the task by module name, not from __main__
    from benchmarks.bench_attention import bench_task as task

    rows = []
    try:
        for p in args.sps:
            per_rank = run_distributed(
                task, p, args.seq_lens, args.heads, args.kv_heads, args.head_dim, not args.full_mask, args.reps,
                args.dtype, timeout=3600,
            )
            rows += per_rank[0]
    finally:
        close_all_pools()
    write_report(rows, args)


if __name__ == "__main__":
    main()
