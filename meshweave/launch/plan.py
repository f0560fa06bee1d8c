"""`meshweave plan`: describe a layout without starting any process.

Prints the mesh, every rank's coordinates, stage, layers and peers, parameter count, FLOPs per
token, the pipeline bubble the schedule implies, and a per-rank memory estimate. The estimate
is an analytic model (stated in the output), not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshweave.core.dims import ParallelDims
from meshweave.core.schema import Config
from meshweave.models.registry import model_spec
from meshweave.parallel.pipeline_split import split_layers
from meshweave.parallel.schedules import is_multi_stage, stage_ids_of_rank, stage_style

GIB = 2**30


def stage_layers(cfg: Config, pp: int) -> dict[int, list[tuple[int, list[int]]]]:
    """(stage index, layers) of each pipeline rank's chunks, with the split and placement the
    pipeline uses (even or cost-weighted split; loop or V placement of virtual stages)."""
    p = cfg.parallel
    virtual = p.virtual_stages if pp > 1 and is_multi_stage(p.pp_schedule) else 1
    spec = model_spec(cfg.model.kind)
    layers = split_layers(spec, cfg.model, cfg.train.seq_len, pp * virtual, p.pp_split if pp > 1 else "even")
    return {r: [(s, layers[s]) for s in stage_ids_of_rank(r, pp, virtual, stage_style(p.pp_schedule))]
            for r in range(pp)}


def bubble_fraction(schedule: str, pp: int, microbatches: int, virtual: int) -> float:
    """Idle fraction of a step in the ideal model (equal stage times; tF, tB = 2tF)."""
    if pp == 1:
        return 0.0
    if schedule in ("gpipe", "1f1b"):
        return (pp - 1) / (microbatches + pp - 1)
    if schedule in ("zbvzerobubble", "interleavedzerobubble", "dualpipev"):
        # Splitting backward into input- and weight-gradient halves fills the bubble with W work:
        # ZB-H1's bubble is about a third of 1F1B's; the V schedules approach zero.
        base = (pp - 1) / (virtual * microbatches + pp - 1)
        return base / 3
    return (pp - 1) / (virtual * microbatches + pp - 1)  # interleaved / looped


@dataclass
class MemoryEstimate:
    params: int
    state_bytes: float
    activation_bytes: float

    @property
    def total(self) -> float:
        return self.state_bytes + self.activation_bytes


def memory_per_rank(cfg: Config, dims: ParallelDims, stage: int) -> MemoryEstimate:
    """Weights+grads+AdamW (16 B/param fp32, sharded by FSDP over dp*sp) + activations in flight.
    `stage` is the pipeline rank; its chunks' layers come from `stage_layers`."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    spec = model_spec(m.kind)
    chunks = stage_layers(cfg, dims.pp)[stage]
    n_stages = dims.pp * len(chunks)
    layers = sum(len(ls) for _, ls in chunks)
    holds_first, holds_last = any(s == 0 for s, _ in chunks), any(s == n_stages - 1 for s, _ in chunks)
    params = spec.stage_parameters(m, layers, holds_first, holds_last) // dims.tp
    shard = dims.dp * dims.sp if p.dp_mode == "fsdp" else 1
    state = params * 16 / shard
    act_bytes = 2 if t.dtype == "bfloat16" or (t.dtype == "auto" and t.device == "cuda") else 4
    rows = t.global_batch // dims.dp // (p.microbatches if dims.pp > 1 else t.grad_accum)
    tokens = rows * t.seq_len / dims.sp
    # Per token per layer ~17*width values kept for backward with flash attention (Korthikanti et al.'s
    # 34*d bytes in 16-bit), sharded over tp by sequence-parallel norms; only block inputs kept with AC.
    width = spec.hidden_width(m)
    per_layer = (2 * width if p.activation_checkpointing else 17 * width) * act_bytes / dims.tp
    in_flight = min(dims.pp - stage, p.microbatches) if dims.pp > 1 else 1
    activations = tokens * per_layer * layers * in_flight + tokens * spec.output_width(m) / dims.tp * 4 * holds_last
    return MemoryEstimate(params, state, activations)


def picked_defaults(given: Config, resolved: Config) -> list[str]:
    """One line per value meshweave chose because the config left it open (shown by `plan`)."""
    notes = []
    if given.parallel.microbatches == 0 and resolved.parallel.pp > 1:
        notes.append(f"parallel.microbatches: {resolved.parallel.microbatches} (the fewest >= pp that divide the "
                     f"per-rank batch; set it to choose)")
    if resolved.parallel.sp_method == "usp" and (given.parallel.usp.ulysses == 0 or given.parallel.usp.ring == 0):
        u = resolved.parallel.usp
        notes.append(f"parallel.usp: ulysses {u.ulysses} x ring {u.ring} (the largest Ulysses degree the heads "
                     f"allow; set parallel.usp to choose)")
    return notes


def render_plan(cfg: Config, dims: ParallelDims, picked: list[str] | None = None) -> str:
    """The plan text for a resolved config; `picked` lists the values meshweave chose (see picked_defaults)."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    spec = model_spec(m.kind)
    lines = [f"mesh (pp, dp, sp, tp) = {dims.shape()} over {dims.world_size} ranks; "
             f"data parallel: {p.dp_mode} over dp*sp = {dims.dp * dims.sp} ranks"]
    lines.append(f"model: {m.kind}, {spec.parameter_count(m):,} parameters, "
                 f"{spec.flops_per_token(m, t.seq_len):,.0f} training FLOPs/token (seq_len {t.seq_len}, causal)")
    if dims.sp > 1:
        extra = f" (ulysses {p.usp.ulysses} x ring {p.usp.ring})" if p.sp_method == "usp" else ""
        lines.append(f"sequence parallel: {p.sp_method}{extra}, {t.seq_len // dims.sp} tokens per rank")
    layers = stage_layers(cfg, dims.pp)
    if dims.pp > 1:
        v = p.virtual_stages
        lines.append(f"pipeline: {p.pp_schedule}, {p.microbatches} microbatches, {v} chunk(s) per rank, "
                     f"{p.pp_split} layer split; ideal bubble fraction "
                     f"{bubble_fraction(p.pp_schedule, dims.pp, p.microbatches, v):.3f}")
        for r, chunks in layers.items():
            lines.append(f"  pp rank {r}: " + ", ".join(f"stage {st} = layers {ls[0]}-{ls[-1]}" for st, ls in chunks))
    lines += [f"picked: {note}" for note in picked or []]
    lines.append("")
    lines.append(f"{'rank':>5} {'pp':>3} {'dp':>3} {'sp':>3} {'tp':>3}  {'layers':<14} {'dp peers':<16} "
                 f"{'sp peers':<16} {'tp peers':<16} {'mem GiB':>8}")
    for rank in range(dims.world_size):
        c = dims.coordinate(rank)
        peers = {a: _peers(dims, rank, a) for a in ("dp", "sp", "tp")}
        chunks = "+".join(f"{ls[0]}-{ls[-1]}" if ls else "-" for _, ls in layers[c["pp"]])
        mem = memory_per_rank(cfg, dims, c["pp"])
        lines.append(f"{rank:>5} {c['pp']:>3} {c['dp']:>3} {c['sp']:>3} {c['tp']:>3}  {chunks:<14} "
                     f"{peers['dp']:<16} {peers['sp']:<16} {peers['tp']:<16} {mem.total / GIB:>8.3f}")
    worst = max((memory_per_rank(cfg, dims, s) for s in range(dims.pp)), key=lambda e: e.total)
    lines.append("")
    lines.append(f"memory per rank (estimate, worst stage): {worst.params:,} parameters held, "
                 f"{worst.state_bytes / GIB:.3f} GiB weights+grads+AdamW, {worst.activation_bytes / GIB:.3f} GiB activations")
    return "\n".join(lines)


def _peers(dims: ParallelDims, rank: int, axis: str) -> str:
    group = next(g for g in dims.groups((axis,)) if rank in g)
    text = ",".join(map(str, group))
    return text if len(text) <= 16 else f"{group[0]}..{group[-1]}/{len(group)}"
