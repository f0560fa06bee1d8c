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
workers with the same thread count), efficiency against one process using the same total cores
(T_1,P-threads / T_P: P processes x t threads vs 1 process x P*t threads, capped at the machine's
cores; >= 1 means splitting the sequence over processes beats multithreading one process), speed
against the best peer, payload bytes per rank from the CommLedger (meshweave and the
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
from contextlib import contextmanager
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

RESULTS = Path(os.environ.get("MESHWEAVE_BENCH_OUT") or REPO / "benchmarks" / "results")  # `meshweave bench --out`


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


@contextmanager
def _threads(n: int):
    """Run the block with `n` intra-op threads (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def _cpu_time_once(fn) -> float:
    """Process CPU time of one call (all threads of the process), the slowest rank's: less sensitive than
    wall time to other jobs on a shared machine (waiting for a core is not counted)."""
    dist.barrier()
    c0 = time.process_time()
    fn()
    used = torch.tensor([time.process_time() - c0], dtype=torch.float64)
    dist.all_reduce(used, op=dist.ReduceOp.MAX)
    return used.item()


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


def _methods_under_test(only: list[str] | None) -> tuple[list[tuple[str, str, object, list, str | None]], list, int | None]:
    """Our SP ops and the peers over this pool's ranks (those named in `only`): (methods, groups to destroy, usp degree)."""
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
    if only:  # labels as in the report; "usp" matches "usp(u=2)"
        methods = [m for m in methods if m[0] in only or m[0].split("(")[0] in only]
    return methods, pgs, u


def bench_task(seq_lens: list[int], heads: int, kv_heads_list: list[int], head_dim: int, causal: bool, reps: int, dtype: str,
               only: list[str] | None = None) -> list[dict]:
    """Runs on every rank: all methods (or those named in `only`) at every (kv heads, sequence length).
    Returns rank-0-style rows."""
    rank, size = dist.get_rank(), dist.get_world_size()
    same_cores = min(size * torch.get_num_threads(), os.cpu_count() or 1)  # all workers' threads, capped at the cores
    methods, pgs, u = _methods_under_test(only)
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
        # single-process reference: the whole sequence on rank 0 (the others wait at the barrier), timed
        # with this worker's threads and with the threads of all P workers together (same total cores)
        single = _prepare(local_attention, "local", full, causal, 0, 1, []) if rank == 0 else None
        if single is not None:
            with _threads(same_cores):
                single[1]()  # warm-up of the wider OpenMP team
        dist.barrier()
        entries, here, cpu = [], [], {}
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
        single_mt: tuple[list, list] = ([], [])
        for _ in range(reps):
            if single is not None:
                single_t[0].append(_time_once(single[0], False))
                single_t[1].append(_time_once(single[1], False))
                with _threads(same_cores):
                    single_mt[0].append(_time_once(single[0], False))
                    single_mt[1].append(_time_once(single[1], False))
            dist.barrier()
            for row, fwd, fwdbwd, t_f, t_fb in entries:
                t_f.append(_time_once(fwd, True))
                t_fb.append(_time_once(fwdbwd, True))
                cpu.setdefault(row["method"], []).append(_cpu_time_once(fwdbwd))
        for row, _f, _fb, t_f, t_fb in entries:
            row["fwd"], row["fwdbwd"] = statistics.median(t_f), statistics.median(t_fb)
            row["fwd_best"], row["fwdbwd_best"] = min(t_f), min(t_fb)
            row["fwdbwd_cpu"] = statistics.median(cpu[row["method"]])
        if single is not None:
            for row in here:
                row["single_fwd"], row["single_fwdbwd"] = statistics.median(single_t[0]), statistics.median(single_t[1])
                row["single_mt_fwd"], row["single_mt_fwdbwd"] = statistics.median(single_mt[0]), statistics.median(single_mt[1])
                row["threads_per_rank"], row["single_mt_threads"] = torch.get_num_threads(), same_cores
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


PEERS = ("allgather-kv (naive)", "torch ring template", "deepspeed ulysses")
TIMES = ("fwd", "fwdbwd", "fwdbwd_best", "fwdbwd_cpu")  # median wall, best wall, median process CPU time


def add_ratios(rows: list[dict]) -> None:
    """Per timed row: efficiencies (same threads per process; same total cores), speed vs ring and vs the best peer."""
    by_key: dict[tuple, list[dict]] = {}
    for r in rows:
        by_key.setdefault((r["P"], r["kv"], r["N"]), []).append(r)
    for group in by_key.values():
        timed = [r for r in group if "fwd" in r]
        ring = next((r for r in timed if r["method"] == "ring"), None)
        peers = [r for r in timed if r["method"] in PEERS]
        best = {k: min(peers, key=lambda r: r[k]) if peers else None for k in TIMES}
        for r in timed:
            r["eff_fwd"] = r["single_fwd"] / (r["P"] * r["fwd"])
            r["eff_fwdbwd"] = r["single_fwdbwd"] / (r["P"] * r["fwdbwd"])
            r["vs_same_cores_fwd"] = r["single_mt_fwd"] / r["fwd"]
            r["vs_same_cores_fwdbwd"] = r["single_mt_fwdbwd"] / r["fwdbwd"]
            r["vs_ring_fwdbwd"] = ring["fwdbwd"] / r["fwdbwd"] if ring else None
            if r["method"] not in PEERS:
                for k in TIMES:
                    r[f"best_peer_{k}"] = best[k]["method"] if best[k] else None
                    r[f"vs_best_peer_{k}"] = best[k][k] / r[k] if best[k] else None


def _ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def write_report(rows: list[dict], args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    add_ratios(rows)
    elem = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    threads = sorted({(r["P"], r["threads_per_rank"], r["single_mt_threads"]) for r in rows if "single_mt_threads" in r})
    lines = [
        "# Sequence-parallel attention on CPU (gloo)",
        "",
        f"B=1, heads={args.heads}, kv_heads in {args.kv_heads}, head_dim={args.head_dim}, {args.dtype}, "
        f"{'causal' if not args.full_mask else 'full mask'}; median of {args.reps} reps, slowest rank. "
        f"Machine: {os.cpu_count()} cores shared by all P processes (efficiency bound ~{os.cpu_count()}/P). "
        f"torch {torch.__version__}. Load average (1/5/15 min) at the start: {args.load_start}, at the end of the run: "
        f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs share the machine: expect noise).",
        "",
        "Columns: eff = T_single / (P * T_P), the single process with one worker's threads; "
        "'vs 1 proc same cores' = T_single(P x t threads) / T_P, one process given the threads of all P workers "
        "together (capped at the machine's cores: " + ", ".join(f"P={p}: {t} thread(s) per rank vs {m} in one process"
                                                           for p, t, m in threads) + "); > 1: the P processes are faster. "
        "'vs ring' = meshweave ring time / method time; 'vs best peer' = fastest peer's time / method time "
        "(meshweave methods only; >= 1: at least as fast as every peer). "
        "Bytes = payload handed to communication calls per rank for one fwd+bwd (ledger; '~' analytic).",
        "",
        "| P | kv heads | N | method | fwd ms | fwd+bwd ms | eff fwd | eff fwd+bwd | vs 1 proc same cores fwd | "
        "vs 1 proc same cores fwd+bwd | vs ring (fwd+bwd) | vs best peer fwd | vs best peer fwd+bwd | MB/rank | calls | "
        "peak RSS MB | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "fwd" not in r:
            lines.append(f"| {r['P']} | {r['kv']} | {r['N']} | {r['method']} |" + " |" * 12 + f" {r.get('note', '')} |")
            continue
        mb = r["bytes"] / 2**20 if r["bytes"] else None
        if mb is None:
            ab = analytic_bytes(r["method"], r["P"], r["N"], args.heads, r["kv"], args.head_dim, elem)
            mb_s = f"~{ab / 2**20:.2f}" if ab else "n/a"
        else:
            mb_s = f"{mb:.2f}"
        lines.append(
            f"| {r['P']} | {r['kv']} | {r['N']} | {r['method']} | {1e3 * r['fwd']:.1f} | {1e3 * r['fwdbwd']:.1f} | "
            f"{r['eff_fwd']:.2f} | {r['eff_fwdbwd']:.2f} | {r['vs_same_cores_fwd']:.2f} | {r['vs_same_cores_fwdbwd']:.2f} | "
            f"{_ratio(r['vs_ring_fwdbwd'])} | {_ratio(r.get('vs_best_peer_fwd'))} | {_ratio(r.get('vs_best_peer_fwdbwd'))} | "
            f"{mb_s} | {r['calls'] or ''} | {r['peak_mb']:.0f} | {r.get('note', '')} |"
        )
    lines += ["", "meshweave vs the fastest peer (fwd+bwd; ratio = peer time / ours, < 1 means the peer is faster):", "",
              "| P | kv heads | N | fastest peer | " + " | ".join(_ours(rows)) + " |",
              "|---|---|---|---|" + "---|" * len(_ours(rows))]
    for key in dict.fromkeys((r["P"], r["kv"], r["N"]) for r in rows):
        group = {r["method"]: r for r in rows if (r["P"], r["kv"], r["N"]) == key and "fwd" in r}
        peer = next((r.get("best_peer_fwdbwd") for r in group.values() if r.get("best_peer_fwdbwd")), None)
        if peer is None:
            continue
        cells = []
        for m in _ours(rows):
            ratio = group[m].get("vs_best_peer_fwdbwd") if m in group else None
            cells.append("" if ratio is None else (f"{ratio:.2f}" if round(ratio, 2) >= 1 else f"**{ratio:.2f}**"))
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {peer} ({1e3 * group[peer]['fwdbwd']:.1f} ms) | " + " | ".join(cells) + " |")
    lines += ["", "Load-robust view of fwd+bwd (other jobs inflate medians): best of the reps (wall) and the median "
              "process CPU time per rank (slowest rank), and the same ratios against the fastest peer by each:", "",
              "| P | kv heads | N | method | best ms | CPU ms | vs best peer (best) | vs best peer (CPU) |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['P']} | {r['kv']} | {r['N']} | {r['method']} | {1e3 * r['fwdbwd_best']:.1f} | "
              f"{1e3 * r['fwdbwd_cpu']:.1f} | {_ratio(r.get('vs_best_peer_fwdbwd_best'))} | "
              f"{_ratio(r.get('vs_best_peer_fwdbwd_cpu'))} |" for r in rows if "fwdbwd_cpu" in r]
    single = {(r["P"], r["kv"], r["N"]): r for r in rows if "single_fwd" in r}
    lines += ["", "Single process, whole sequence (measured on rank 0 of each P-process pool, others idle; "
              "t = one worker's threads, T = all workers' threads capped at the cores):", "",
              "| pool P | kv heads | N | fwd ms (t) | fwd+bwd ms (t) | fwd ms (T) | fwd+bwd ms (T) | t | T |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {p} | {kv} | {n} | {1e3 * r['single_fwd']:.1f} | {1e3 * r['single_fwdbwd']:.1f} | "
              f"{1e3 * r['single_mt_fwd']:.1f} | {1e3 * r['single_mt_fwdbwd']:.1f} | {r['threads_per_rank']} | "
              f"{r['single_mt_threads']} |" for (p, kv, n), r in sorted(single.items())]
    lines += ["", f"Command: `{' '.join(['python', *sys.argv])}`", ""]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    (RESULTS / f"{args.name}.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, RESULTS / f"{args.name}.png")
    print("\n".join(lines))


def _ours(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in rows if r["method"] not in PEERS))


def _plot(rows: list[dict], path: Path) -> None:
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
        same_cores = sorted({(r["N"], 1e3 * r["single_mt_fwdbwd"]) for r in sel if "single_mt_fwdbwd" in r})
        if same_cores:
            ax.plot(*zip(*same_cores), "k:", label="1 process, all P workers' threads")
        ax.set(title=f"fwd+bwd, P={p}, kv heads={kv}", xlabel="sequence length", ylabel="ms", xscale="log", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
    ap.add_argument("--name", default="attention", help="results file stem under benchmarks/results/")
    ap.add_argument("--methods", nargs="+", default=None,
                    help="only these methods, by report label (e.g. ulysses 'deepspeed ulysses'); default all")
    args = ap.parse_args()
    args.load_start = "/".join(f"{x:.1f}" for x in os.getloadavg())
    if args.quick:
        args.seq_lens, args.reps = [512, 1024], 2
    # the workers import the task by module name, not from __main__
    from benchmarks.bench_attention import bench_task as task

    rows = []
    try:
        for p in args.sps:
            per_rank = run_distributed(
                task, p, args.seq_lens, args.heads, args.kv_heads, args.head_dim, not args.full_mask, args.reps,
                args.dtype, args.methods, timeout=3600,
            )
            rows += per_rank[0]
    finally:
        close_all_pools()
    write_report(rows, args)


if __name__ == "__main__":
    main()
