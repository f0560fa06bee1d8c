"""`meshweave plan`: describe a layout without starting any process.

Prints the mesh, every rank's coordinates, stage, layers and peers, parameter count, FLOPs per
token, the pipeline bubble the schedule implies, and a per-rank memory estimate. The estimate
is an analytic model (stated in the output), not a measurement.

Nothing here grows with the size it describes: layer splits are ranges (a model of 10^7 layers
costs no list), peers are computed from coordinates, and a world larger than MAX_RANK_ROWS ranks
shows the first ranks, the last one and the count of the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meshweave.core.dims import ParallelDims
from meshweave.core.schema import Config
from meshweave.models.registry import model_spec
from meshweave.models.spec import slot_kinds
from meshweave.parallel.pipeline_split import split_layers
from meshweave.parallel.schedules import is_multi_stage, stage_ids_of_rank, stage_style

GIB = 2**30
MAX_RANK_ROWS = 128  # worlds up to this size list every rank; larger ones the first HEAD_ROWS and the last
HEAD_ROWS = 64
Chunks = list[tuple[int, range]]  # (global stage index, its layers) of each chunk a pipeline rank runs


class _EvenSplit(Sequence):
    """The layers of each stage of an even split, computed on demand (as pipeline_split.split_even lists them)."""

    def __init__(self, n_layers: int, n_stages: int) -> None:
        self.per, self.n_stages = n_layers // n_stages, n_stages

    def __len__(self) -> int:
        return self.n_stages

    def __getitem__(self, stage: int) -> range:  # type: ignore[override]
        return range(stage * self.per, (stage + 1) * self.per)


def _virtual(cfg: Config, pp: int) -> int:
    return cfg.parallel.virtual_stages if pp > 1 and is_multi_stage(cfg.parallel.pp_schedule) else 1


def stage_splits(cfg: Config, pp: int) -> Sequence[range]:
    """The layers of every global stage, with the split the pipeline uses (even, or cost-weighted: the
    validation bounds the size of a cost split)."""
    n_stages = pp * _virtual(cfg, pp)
    spec = model_spec(cfg.model.kind)
    if pp == 1 or cfg.parallel.pp_split == "even":
        return _EvenSplit(spec.num_layers(cfg.model), n_stages)
    layers = split_layers(spec, cfg.model, cfg.train.seq_len, n_stages, cfg.parallel.pp_split)
    return [range(ls[0], ls[-1] + 1) for ls in layers]


def rank_chunks(cfg: Config, pp: int, rank: int, splits: Sequence[range] | None = None) -> Chunks:
    """(stage index, layers) of pipeline rank `rank`'s chunks (loop or V placement of virtual stages)."""
    splits = stage_splits(cfg, pp) if splits is None else splits
    ids = stage_ids_of_rank(rank, pp, _virtual(cfg, pp), stage_style(cfg.parallel.pp_schedule))
    return [(s, splits[s]) for s in ids]


def stage_layers(cfg: Config, pp: int) -> dict[int, Chunks]:
    """(stage index, layers) of each pipeline rank's chunks (every rank: use `rank_chunks` for one)."""
    splits = stage_splits(cfg, pp)
    return {r: rank_chunks(cfg, pp, r, splits) for r in range(pp)}


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


def memory_per_rank(cfg: Config, dims: ParallelDims, stage: int, splits: Sequence[range] | None = None) -> MemoryEstimate:
    """Weights+grads+AdamW (16 B/param fp32, sharded by FSDP over dp*sp) + activations in flight.
    `stage` is the pipeline rank; its chunks' layers come from `rank_chunks` (pass `splits`, from
    `stage_splits`, when estimating several ranks)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    spec = model_spec(m.kind)
    chunks = rank_chunks(cfg, dims.pp, stage, splits)
    n_stages = dims.pp * len(chunks)
    layers = sum(len(ls) for _, ls in chunks)
    holds_first, holds_last = any(s == 0 for s, _ in chunks), any(s == n_stages - 1 for s, _ in chunks)
    params = spec.stage_parameters(m, layers, holds_first, holds_last) // dims.tp
    shard = dims.dp * dims.sp if p.dp_mode == "fsdp" else 1
    state = params * 16 / shard
    act_bytes = 2 if t.dtype == "bfloat16" or (t.dtype == "auto" and t.device == "cuda") else 4
    rows = t.global_batch // dims.dp // (p.microbatches if dims.pp > 1 else t.grad_accum)
    # A video model's samples are frames x patches tokens, not train.seq_len (which it does not read).
    per_sample = spec.tokens_per_sample(m) if spec.tokens_per_sample is not None else t.seq_len
    tokens = rows * per_sample / dims.sp
    if p.adaptive.enabled:  # the planner caps what a rank holds per micro-batch
        tokens = p.adaptive.tokens_per_rank or cfg.data.max_len
    # Per token per layer ~17*width values kept for backward with flash attention (Korthikanti et al.'s
    # 34*d bytes in 16-bit), sharded over tp by sequence-parallel norms (text models; a factorised model's
    # activations stay whole over tp); only block inputs kept with AC.
    width = spec.hidden_width(m)
    tp_shards = dims.tp if spec.factorised_dims is None else 1
    per_layer = (2 * width if p.activation_checkpointing else 17 * width) * act_bytes / tp_shards
    in_flight = min(dims.pp - stage, p.microbatches) if dims.pp > 1 else 1
    activations = tokens * per_layer * layers * in_flight + tokens * spec.output_width(m) / tp_shards * 4 * holds_last
    return MemoryEstimate(params, state, activations)


def worst_memory(cfg: Config, dims: ParallelDims, splits: Sequence[range] | None = None) -> MemoryEstimate:
    """The largest per-rank estimate over the pipeline ranks. Past 1024 stages the split is even (a cost
    split that large is refused by validation), where the first and last ranks bound the others."""
    splits = stage_splits(cfg, dims.pp) if splits is None else splits
    candidates = range(dims.pp) if dims.pp <= 1024 else (0, dims.pp - 1)
    return max((memory_per_rank(cfg, dims, s, splits) for s in candidates), key=lambda e: e.total)


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


# The op each attention slot kind gets under sp, by name (parallel/sequence.py's SLOT_OP_BUILDERS builds them;
# plan imports no torch, so the names are listed here). Kinds in this order; others are shown as they are named.
SLOT_KIND_ORDER = ("linear", "softmax")


def slot_op_name(kind: str, method: str, kinds: frozenset[str]) -> str:
    """What a slot of `kind` runs under sp_method `method` in a model with slot kinds `kinds`."""
    if method == "dsp":
        return "local (DSP switches the sharded dim between blocks)"
    if method == "ulysses" and kind not in ("softmax", "linear"):  # factorised layers: Ulysses as a generic runtime
        return "ulysses over the flattened tokens (all-to-all q, k, v and the output)"
    if method == "ring" and kind not in ("softmax", "linear"):  # factorised layers: the frames-sharded baseline
        return "ring where the attended dim is sharded, else local"
    if kind == "linear":
        return "LASP-2"
    if kind == "softmax" and method == "allgather":
        return "LASP-2H (all-gather K/V)" if "linear" in kinds else "all-gather K/V"
    return method if kind == "softmax" else f"{kind} op"


def slot_ops_text(kinds: frozenset[str], method: str) -> str:
    """One phrase per slot kind: "linear layers: LASP-2; softmax layers: ring"."""
    ordered = [k for k in SLOT_KIND_ORDER if k in kinds] + sorted(kinds - set(SLOT_KIND_ORDER))
    return "; ".join(f"{kind} layers: {slot_op_name(kind, method, kinds)}" for kind in ordered)


def render_plan(cfg: Config, dims: ParallelDims, picked: list[str] | None = None) -> str:
    """The plan text for a resolved config; `picked` lists the values meshweave chose (see picked_defaults)."""
    p, m, t = cfg.parallel, cfg.model, cfg.train
    spec = model_spec(m.kind)
    lines = [f"mesh (pp, dp, sp, tp) = {dims.shape()} over {dims.world_size:,} ranks; "
             f"data parallel: {p.dp_mode} over dp*sp = {dims.dp * dims.sp:,} ranks"]
    per_sample = spec.tokens_per_sample(m) if spec.tokens_per_sample is not None else t.seq_len
    context = f"seq_len {t.seq_len}, causal" if spec.tokens_per_sample is None else f"{per_sample:,} tokens per sample"
    lines.append(f"model: {m.kind}, {spec.parameter_count(m):,} parameters, "
                 f"{spec.flops_per_token(m, t.seq_len):,.0f} training FLOPs/token ({context})")
    if dims.sp > 1:
        extra = f" (ulysses {p.usp.ulysses} x ring {p.usp.ring})" if p.sp_method == "usp" else ""
        share = f"{t.seq_len // dims.sp}" if spec.tokens_per_sample is None else f"~{-(-per_sample // dims.sp):,}"
        lines.append(f"sequence parallel: {p.sp_method}{extra}, {share} tokens per rank; "
                     f"{slot_ops_text(slot_kinds(spec, m), p.sp_method)}")
    splits = stage_splits(cfg, dims.pp)
    if dims.pp > 1:
        v = p.virtual_stages
        lines.append(f"pipeline: {p.pp_schedule}, {p.microbatches} microbatches, {v} chunk(s) per rank, "
                     f"{p.pp_split} layer split; ideal bubble fraction "
                     f"{bubble_fraction(p.pp_schedule, dims.pp, p.microbatches, v):.3f}")
        for r in _shown(dims.pp, 8):
            if r is None:
                lines.append(f"  ... {dims.pp - 9:,} more pp ranks")
                continue
            chunks = rank_chunks(cfg, dims.pp, r, splits)
            lines.append(f"  pp rank {r}: " + ", ".join(f"stage {st} = layers {_layers(ls)}" for st, ls in chunks))
    lines += [f"picked: {note}" for note in picked or []]
    lines.append("")
    lines.append(f"{'rank':>5} {'pp':>3} {'dp':>3} {'sp':>3} {'tp':>3}  {'layers':<14} {'dp peers':<16} "
                 f"{'sp peers':<16} {'tp peers':<16} {'mem GiB':>8}")
    memory: dict[int, MemoryEstimate] = {}
    for rank in _shown(dims.world_size, HEAD_ROWS if dims.world_size > MAX_RANK_ROWS else dims.world_size):
        if rank is None:
            lines.append(f"{'...':>5} {dims.world_size - HEAD_ROWS - 1:,} more ranks not listed (the first "
                         f"{HEAD_ROWS} and the last are)")
            continue
        c = dims.coordinate(rank)
        peers = {a: _peers(dims, rank, a) for a in ("dp", "sp", "tp")}
        chunks = _chunks_text(rank_chunks(cfg, dims.pp, c["pp"], splits))
        mem = memory.setdefault(c["pp"], memory_per_rank(cfg, dims, c["pp"], splits))
        lines.append(f"{rank:>5} {c['pp']:>3} {c['dp']:>3} {c['sp']:>3} {c['tp']:>3}  {chunks:<14} "
                     f"{peers['dp']:<16} {peers['sp']:<16} {peers['tp']:<16} {mem.total / GIB:>8.3f}")
    worst = worst_memory(cfg, dims, splits)
    lines.append("")
    lines.append(f"memory per rank (estimate, worst stage): {worst.params:,} parameters held, "
                 f"{worst.state_bytes / GIB:.3f} GiB weights+grads+AdamW, {worst.activation_bytes / GIB:.3f} GiB activations")
    return "\n".join(lines)


def _shown(count: int, head: int) -> list[int | None]:
    """Indices listed for `count` items: all when head covers them, else 0..head-1, None (a gap), count-1."""
    return list(range(count)) if count <= head + 1 else [*range(head), None, count - 1]


def _layers(ls: range) -> str:
    return f"{ls[0]}-{ls[-1]}" if ls else "-"


def _chunks_text(chunks: Chunks) -> str:
    if len(chunks) <= 4:
        return "+".join(_layers(ls) for _, ls in chunks)
    return f"{_layers(chunks[0][1])}+..+{_layers(chunks[-1][1])}"


def _peers(dims: ParallelDims, rank: int, axis: str) -> str:
    """The ranks that differ from `rank` only along `axis`, from its coordinate (no group is listed)."""
    size, coord = getattr(dims, axis), dims.coordinate(rank)

    def member(i: int) -> int:
        return dims.rank_of(**{**coord, axis: i})

    if size <= 8:
        text = ",".join(str(member(i)) for i in range(size))
        if len(text) <= 16:
            return text
    return f"{member(0)}..{member(size - 1)}/{size}"
