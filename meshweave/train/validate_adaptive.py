"""Up-front rules for `parallel.sp: adaptive` and unpacked data (`data.packing: false`); torch-free, one line each."""

from __future__ import annotations

from meshweave.core.dims import resolved_dp
from meshweave.core.schema import Config
from meshweave.models.registry import model_spec

ADAPTIVE_METHODS = ("ulysses", "ring", "tokenring", "allgather")  # the methods that run inside one group


def adaptive_problems(cfg: Config, world: int) -> list[str]:
    p, d, a = cfg.parallel, cfg.data, cfg.parallel.adaptive
    if not a.enabled:
        if not d.packing:
            return ["data.packing: false (whole documents) is for parallel.sp: adaptive; set sp: adaptive, or "
                    "packing: true"]
        return []
    ranks = resolved_dp(p, world)
    if p.tp != 1 or p.pp != 1:
        return [f"parallel.sp: adaptive carves its groups out of all ranks and runs with tp 1 and pp 1 "
                f"(got tp {p.tp}, pp {p.pp}); set tp: 1 and pp: 1"]
    if d.packing:
        return ["parallel.sp: adaptive places whole documents; set data.packing: false (with data.max_len and "
                "data.tokens_per_step)"]
    if p.sp_method not in ADAPTIVE_METHODS:
        return [f"parallel.sp_method: {p.sp_method} cannot run inside adaptive groups; use one of "
                f"{', '.join(ADAPTIVE_METHODS)}"]
    if model_spec(cfg.model.kind).build_dataset is not None:
        return [f"parallel.sp: adaptive places text documents; model kind {cfg.model.kind} reads its own data"]
    if ranks & (ranks - 1):
        return [f"parallel.sp: adaptive needs a power-of-two number of ranks for its aligned groups, got {ranks}; "
                f"run on 1, 2, 4, 8, ... processes"]
    return _capacity_problems(cfg, ranks)


def _capacity_problems(cfg: Config, ranks: int) -> list[str]:
    a, d = cfg.parallel.adaptive, cfg.data
    capacity = a.tokens_per_rank or d.max_len
    if a.strategy == "static" and (a.static_size > ranks or a.static_size & (a.static_size - 1)):
        return [f"parallel.adaptive.static_size: {a.static_size} must be a power of two up to the {ranks} ranks"]
    if capacity * ranks < d.max_len:
        return [f"parallel.adaptive.tokens_per_rank: {capacity} tokens on each of {ranks} ranks cannot hold a "
                f"sequence of data.max_len {d.max_len}; raise tokens_per_rank or lower data.max_len"]
    return []
