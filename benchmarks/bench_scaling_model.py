"""The arithmetic of `bench_scaling.py`'s weak/strong study: layouts, analytic volumes, ratios, projection.

Pure functions over configs, ledger snapshots and timings (no processes), so that a test can recompute
every printed ratio from the raw numbers the study keeps in its JSON.

Analytic volume per rank per optimizer step, in the ledger's terms (the payload handed to each call),
fp32 on CPU, no gradient accumulation, no activation checkpointing:
- dp (FSDP2 over dp x sp, N ranks; tests/test_dp_volume.py): all-gather 4 * (2 * (s_emb + sum s_block) + s_head),
  reduce-scatter 4 * N * (s_emb + sum s_block + s_head), s_u = the unit's shard (dim 0 padded to N).
- tp (meshweave/parallel/tensor_parallel_comm.py): tensor_parallel_bytes over this rank's tokens.
- pp (meshweave/parallel/pipeline_comm.py): pipeline_p2p_bytes of this rank's stages.
- sp (ring, zigzag; meshweave/attention/ring.py): per layer KV = 2 * B * h_kv * S_local * head_dim elements:
  forward (P-1) sends and receives of KV * 4, backward (P-1) of KV * 4 plus P of KV * 4 (dK/dV), and one
  all-gather of the document ids (B * S_local * 8) per step when documents are masked.

Projection (labelled "projected" wherever shown): a step on a GPU cluster costs
    compute: tokens per rank x c_gpu, c_gpu = flops_per_token / (peak x MFU)      (calibrated: see below)
    comm   : per ledger entry of the measured run, ring-collective time on the assumed link:
             all_gather of x bytes on n ranks (n-1) x / bw, reduce_scatter of X (n-1)/n X / bw,
             all_reduce 2 (n-1)/n X / bw, send/recv X / bw, each call plus (n-1) (or 1) latencies,
    no overlap of compute and communication (an upper bound on the step).
Calibration (`calibrate`): the same form, plus a fixed per-step overhead, is fitted to every measured run of
this study (step = overhead + work x c + link bytes / B + latencies x L, non-negative least squares), and each
run's modelled step is reported beside its measured one. The projection keeps the form and replaces the fitted
c, B and L by the GPU cluster's (c_gpu from FLOPs / (peak x MFU), the links assumed); the CPU's overhead is not
carried over (it is this machine's Python and process cost, not the GPU's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DIMS = ("dp", "tp", "sp", "pp")
# --quick: the smallest model on which every layout of the study still runs (2 layers: one per pp2 stage; 4 heads,
# 2 KV heads: tp2 splits both; seq 32: sp2's zigzag gets 4 chunks of 8), so that the study takes well under a minute
QUICK_MODEL = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden=64",
               "model.vocab_size=320", "train.seq_len=32", "train.global_batch=4", "data.max_bytes=100000"]
FULL_MODEL = ["data.max_bytes=1000000"]  # the default model: dim 256, 4 layers, seq 256, global batch 8


@dataclass(frozen=True)
class Cluster:
    """Assumed GPU cluster (every figure an assumption, printed with each projection)."""

    peak_tflops: float = 989.0  # H100 SXM bf16 dense
    mfu: float = 0.40  # achieved fraction of peak in compute
    gpus_per_node: int = 8
    intra_gbps: float = 450.0  # NVLink, GB/s per direction per GPU
    inter_gbps: float = 50.0  # 400 Gb/s InfiniBand per GPU
    intra_latency_us: float = 5.0
    inter_latency_us: float = 10.0


def layouts(procs: list[int]) -> list[tuple[str, int, dict[str, int]]]:
    """(key, processes, degrees) of the study: one process, and each dimension alone at each count > 1."""
    out = [("1", 1, {})] if 1 in procs else []
    for n in procs:
        if n > 1:
            out += [(f"{d}{n}", n, {d: n}) for d in DIMS]
    return out


def overrides(degrees: dict[str, int], mode: str, n: int, base_seq: int, base_batch: int) -> list[str]:
    """Config overrides of a layout in a mode: strong keeps the global batch and sequence; weak multiplies
    the work by n (the sequence for sp, the global batch otherwise), so work per process stays fixed."""
    sets = [f"parallel.{d}={degrees.get(d, 1)}" for d in DIMS]
    if mode == "weak" and n > 1:
        if "sp" in degrees:
            sets.append(f"train.seq_len={base_seq * n}")
        else:
            sets.append(f"train.global_batch={base_batch * n}")
    return sets


def group_of(key: str) -> str | None:
    """The parallel dimension a ledger key belongs to (None: the trainer's scalar reductions)."""
    group, op = key.split("/", 1)
    if group.startswith("dp_sp:"):
        return "dp"
    if group == "tp" or group == "sp":
        return group
    if group == "pp" and op != "all_reduce":
        return "pp"
    return None


def bytes_by_dim(ledger: dict[str, dict[str, int]], steps: int) -> dict[str, float]:
    out = {d: 0.0 for d in DIMS}
    for key, v in ledger.items():
        dim = group_of(key)
        if dim is not None:
            out[dim] += v["bytes"] / steps
    return out


def _shard(param_shapes: list[tuple[int, ...]], n: int) -> int:
    return sum(math.ceil(s[0] / n) * (math.prod(s) // s[0]) for s in param_shapes)


def analytic_bytes(info: dict, degrees: dict[str, int]) -> dict[str, float | None]:
    """Per rank per step for each dimension (None where this study has no formula: FSDP mixed with tp/pp).

    info: what the run reports (see bench_scaling._measure_study): units' parameter shapes, local rows,
    seq_len, dim, layers, heads, stage ids, document masking."""
    dp, tp, sp, pp = (degrees.get(d, 1) for d in DIMS)
    rows, seq, dim = info["local_rows"], info["seq_len"], info["dim"]
    out: dict[str, float | None] = {d: 0.0 for d in DIMS}
    n = dp * sp
    if n > 1:
        if tp == 1 and pp == 1:
            emb, head = _shard(info["units"]["emb"], n), _shard(info["units"]["head"], n)
            blocks = sum(_shard(b, n) for b in info["units"]["blocks"])
            out["dp"] = 4 * (2 * (emb + blocks) + head) + 4 * n * (emb + blocks + head)
        else:
            out["dp"] = None
    tokens = rows * seq
    if tp > 1:
        from meshweave.parallel.tensor_parallel_comm import tensor_parallel_bytes

        ids, stages = info["stage_ids"] or [0], info["n_stages"]
        out["tp"] = float(sum(tensor_parallel_bytes(tokens, dim, tp, info["layers_of_rank"], 0 in ids,
                                                    stages - 1 in ids).values()))
    if pp > 1:
        from meshweave.parallel.pipeline_comm import pipeline_p2p_bytes

        out["pp"] = float(sum(pipeline_p2p_bytes(info["stage_ids"], info["n_stages"], tokens, dim, tp).values()))
    if sp > 1:
        kv = 2 * rows * info["n_kv_heads"] * (seq // sp) * info["head_dim"]
        per_layer = 2 * ((sp - 1) * kv * 4 + (sp - 1) * kv * 4 + sp * kv * 4)  # sends + receives, fwd + bwd
        ids = rows * (seq // sp) * 8 if info["document_masking"] else 0  # the all_gather's input: int64 ids
        out["sp"] = float(info["n_layers"] * per_layer + ids)
    return out


def _collective_seconds(op: str, calls: int, nbytes: float, n: int, bw: float, latency: float) -> float:
    if n <= 1:
        return 0.0
    if op == "all_gather":
        return (n - 1) * nbytes / bw + calls * (n - 1) * latency
    if op == "reduce_scatter":
        return (n - 1) / n * nbytes / bw + calls * (n - 1) * latency
    if op == "all_reduce":
        return 2 * (n - 1) / n * nbytes / bw + calls * 2 * (n - 1) * latency
    if op.startswith("recv"):
        return 0.0  # a receive is the other end of a send: count each transfer once
    return nbytes / bw + calls * latency  # sends, all_to_all (approximation: one pass over the link)


def projected_comm_seconds(ledger: dict[str, dict[str, int]], steps: int, degrees: dict[str, int], world: int,
                           cluster: Cluster) -> float:
    """Seconds per step of this run's communication on the assumed links (ranks of a group > one node go
    over the inter-node link)."""
    total = 0.0
    for key, v in ledger.items():
        dim = group_of(key)
        if dim is None:
            continue
        op = key.split("/", 1)[1]
        n = world if dim == "dp" else degrees.get(dim, 1)
        n = max(n, degrees.get("dp", 1) * degrees.get("sp", 1)) if dim == "dp" else n
        inter = world > cluster.gpus_per_node and dim in ("dp", "pp")
        bw = (cluster.inter_gbps if inter else cluster.intra_gbps) * 1e9
        lat = (cluster.inter_latency_us if inter else cluster.intra_latency_us) * 1e-6
        total += _collective_seconds(op, v["calls"] / steps, v["bytes"] / steps, n, bw, lat)
    return total


def comm_terms(ledger: dict[str, dict[str, int]], steps: int, degrees: dict[str, int], world: int) -> tuple[float, float]:
    """(link bytes, link latencies) per step of a run's ledger under the ring-collective model of
    `projected_comm_seconds`: its seconds on a link of bandwidth B and latency L are bytes / B + latencies x L."""
    unit_bytes = Cluster(intra_gbps=1e-9, inter_gbps=1e-9, intra_latency_us=0.0, inter_latency_us=0.0)  # 1 byte/s
    unit_latency = Cluster(intra_gbps=math.inf, inter_gbps=math.inf, intra_latency_us=1e6, inter_latency_us=1e6)
    return (projected_comm_seconds(ledger, steps, degrees, world, unit_bytes),
            projected_comm_seconds(ledger, steps, degrees, world, unit_latency))


def calibrate(rows: list[dict], cores: int) -> dict:
    """Fit the cost model to this run's measured steps: step = overhead + work x c + link bytes / B + latencies x L.

    work = tokens per process x max(1, processes / cores) (processes beyond the cores share them); bytes and
    latencies from `comm_terms` of the slowest rank's ledger. Non-negative least squares (scipy's nnls) over
    every measured (layout, run); the fitted figures and each row's modelled step beside its measured one say
    how far the model's form explains this machine, before its coefficients are replaced by a GPU cluster's."""
    from scipy.optimize import nnls

    runs = {(r["key"], r["world"], tuple(r["step_times"])): r for r in rows}.values()  # a run measured once counts once
    feats, measured, names = [], [], []
    for r in runs:
        steps = len(r["step_times"])
        link = max((comm_terms(ledger, steps, r["degrees"], r["world"]) for ledger in r["ledgers"]), default=(0.0, 0.0))
        feats.append([1.0, r["tokens"] / r["world"] * max(1.0, r["world"] / cores), *link])
        measured.append(r["step_s"])
        names.append((r["key"], r["mode"], r["world"]))
    scale = [max(abs(f[i]) for f in feats) or 1.0 for i in range(4)]  # columns of comparable size for the solver
    coef, _ = nnls([[f[i] / scale[i] for i in range(4)] for f in feats], measured)
    coef = [c / sc for c, sc in zip(coef, scale)]
    fitted = [sum(c * x for c, x in zip(coef, f)) for f in feats]
    table = [{"key": k, "mode": m, "world": w, "measured_s": y, "model_s": f, "error": f / y - 1}
             for (k, m, w), y, f in zip(names, measured, fitted)]
    return {"overhead_s": coef[0], "s_per_token": coef[1], "bytes_per_s": 1 / coef[2] if coef[2] > 0 else math.inf,
            "latency_s": coef[3], "cores": cores, "rows": table,
            "mean_abs_error": sum(abs(t["error"]) for t in table) / len(table)}


def gpu_seconds_per_token(flops_per_token: float, cluster: Cluster) -> float:
    return flops_per_token / (cluster.peak_tflops * 1e12 * cluster.mfu)


def fsdp_bytes_at(info: dict, n: int) -> tuple[float, float, int, int]:
    """(all-gather bytes, reduce-scatter bytes, gather calls, scatter calls) per rank per step of pure FSDP on n ranks."""
    emb, head = _shard(info["units"]["emb"], n), _shard(info["units"]["head"], n)
    blocks = [_shard(b, n) for b in info["units"]["blocks"]]
    return (4 * (2 * (emb + sum(blocks)) + head), 4 * n * (emb + sum(blocks) + head), 2 * (1 + len(blocks)) + 1,
            len(blocks) + 2)


def project_dp_weak(info: dict, tokens_per_rank: int, flops_per_token: float, sizes: list[int],
                    cluster: Cluster) -> list[dict]:
    """Projected weak scaling of pure FSDP (fixed tokens per GPU) to `sizes` GPUs, from the analytic volume."""
    compute = tokens_per_rank * gpu_seconds_per_token(flops_per_token, cluster)
    rows = []
    for n in sizes:
        gather, scatter, gc, sc = fsdp_bytes_at(info, n)
        inter = n > cluster.gpus_per_node
        bw = (cluster.inter_gbps if inter else cluster.intra_gbps) * 1e9
        lat = (cluster.inter_latency_us if inter else cluster.intra_latency_us) * 1e-6
        comm = (_collective_seconds("all_gather", gc, gather, n, bw, lat)
                + _collective_seconds("reduce_scatter", sc, scatter, n, bw, lat))
        step = compute + comm
        rows.append({"gpus": n, "compute_s": compute, "comm_s": comm, "step_s": step, "efficiency": compute / step,
                     "link": "inter-node" if inter else "intra-node"})
    return rows


def ratios(rows: list[dict]) -> None:
    """Add speed-up and efficiency to each measured row, from its own timings and the 1-process row of the
    same mode: strong: T1 / Tn and T1 / (n Tn); weak: throughput per process against one process,
    (tokens_n / Tn) / (n tokens_1 / T1)."""
    base = {r["mode"]: r for r in rows if r["world"] == 1}
    for r in rows:
        b = base.get(r["mode"])
        if b is None:
            r["speedup"] = r["efficiency"] = r["cpu_speedup"] = r["cpu_efficiency"] = None
            continue
        throughput, base_throughput = r["tokens"] / r["step_s"], b["tokens"] / b["step_s"]
        r["speedup"] = throughput / base_throughput
        r["efficiency"] = r["speedup"] / r["world"]
        if "cpu_step_s" in r:
            r["cpu_speedup"] = (r["tokens"] / r["cpu_step_s"]) / (b["tokens"] / b["cpu_step_s"])
            r["cpu_efficiency"] = r["cpu_speedup"] / r["world"]
