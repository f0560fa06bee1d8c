"""The adaptive planner's cost model, measured on the ranks and the model that will train (or taken from the config).

FlexSP's coefficients are fitted per model and cluster, so they are measured here at start-up:
- compute: every rank times forward+backward of one sequence at three lengths with the local (one-rank)
  op, and α₁L² + α₂L + β is fitted (non-negative least squares) to the slowest rank's times;
- links: every group size times an all-to-all of 4 MiB (bandwidth) and of 4 KiB (latency, charged once per
  collective a sequence runs on a group: FlexSP's model has no latency term, and on gloo it dominates).
The result is cached per machine and setting (JSON under ~/.cache/meshweave/adaptive/), so later runs start
at once; `parallel.adaptive.cost` overrides any coefficient (a value of 0 means "measure it").

Communicates: a broadcast of one flag (is there a cached model?), and, when measuring, FSDP2's collectives
of the timed steps, one all-reduce of the times and one all-to-all per group size.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from meshweave.core.batch import Batch
from meshweave.core.comm import CommGroup
from meshweave.core.schema import Config
from meshweave.parallel.adaptive import CostModel

ALL_TO_ALL_BYTES = 4 << 20
SMALL_ALL_TO_ALL_BYTES = 4 << 10
REPS = 2


def comm_bytes_per_token(cfg: Config, element_bytes: int) -> float:
    """Bytes one token moves through the SP method per forward+backward, over all layers (Ulysses: q, k, v and
    the output forward, their gradients backward; ring: K and V forward, K, V and their gradients backward)."""
    m = cfg.model
    head_dim = m.dim // m.n_heads
    kv_heads = getattr(m, "n_kv_heads", None) or m.n_heads
    if cfg.parallel.sp_method == "ulysses":
        per_layer = 2 * (2 * m.n_heads + 2 * kv_heads) * head_dim
    else:
        per_layer = 6 * kv_heads * head_dim
    return float(per_layer * m.n_layers * element_bytes)


def collectives_per_sequence(cfg: Config) -> int:
    """Collectives one sequence runs on a group per forward+backward, over all layers (Ulysses: q, k, v and the
    output each way; the ring methods: about four exchanges per layer, counted alike)."""
    per_layer = 8 if cfg.parallel.sp_method == "ulysses" else 4
    return per_layer * cfg.model.n_layers


def cache_path(cfg: Config, world_size: int, device_name: str) -> Path:
    """Where the measured coefficients of this machine, world size, model and SP method are kept."""
    key = json.dumps([platform.node(), world_size, device_name, torch.__version__, cfg.parallel.sp_method,
                      repr(cfg.model), cfg.parallel.activation_checkpointing, cfg.train.dtype], sort_keys=True)
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "meshweave" / "adaptive"
    return root / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def fit_compute(lengths: list[int], seconds: list[float]) -> tuple[float, float, float]:
    """α₁, α₂, β ≥ 0 of t = α₁L² + α₂L + β by non-negative least squares (scipy's NNLS): a plain fit of noisy
    times on a loaded machine can come out negative, which no planner can use. The columns are scaled to the
    largest length first, so that the three coefficients weigh alike in the fit."""
    from scipy.optimize import nnls

    top = float(max(lengths))
    x = np.array([[(n / top) ** 2, n / top, 1.0] for n in lengths])
    (a1, a2, b), _ = nnls(x, np.array(seconds, dtype=np.float64))
    return float(a1 / top ** 2), float(a2 / top), float(b)


def calibration_lengths(max_len: int) -> list[int]:
    """Three lengths up to the longest sequence, long enough that compute shows above the fixed costs."""
    return sorted({max(128, max_len // 4), max(256, max_len // 2), max(1024, max_len)})


def time_compute(step: Callable[[Batch], None], vocab: int, lengths: list[int], device: torch.device,
                 world: CommGroup) -> list[float]:
    """The slowest rank's best-of-REPS forward+backward time at each length (every rank runs every shape:
    FSDP2's collectives need them all)."""
    g = torch.Generator().manual_seed(0)
    step(_random_row(16, vocab, g, device))  # warm-up
    times = []
    for n in lengths:
        row, best = _random_row(n, vocab, g, device), float("inf")
        for _ in range(REPS):
            _sync(device)
            start = time.perf_counter()
            step(row)
            _sync(device)
            best = min(best, time.perf_counter() - start)
        times.append(best)
    return world.all_reduce(torch.tensor(times, dtype=torch.float64, device=device),
                            op=torch.distributed.ReduceOp.MAX).tolist()


def time_all_to_all(groups: dict[int, CommGroup], world: CommGroup, device: torch.device) -> dict[str, dict[int, float]]:
    """Per group size (the slowest group's): the bandwidth in bytes/s of a 4 MiB all-to-all (bytes this rank sends
    to the others over the time) and the latency, the time of a 4 KiB one."""
    bandwidth, latency = {}, {}
    for size in sorted(s for s in groups if s > 1):
        big = _timed_all_to_all(groups[size], world, ALL_TO_ALL_BYTES, device)
        latency[size] = _timed_all_to_all(groups[size], world, SMALL_ALL_TO_ALL_BYTES, device)
        bandwidth[size] = ALL_TO_ALL_BYTES * (size - 1) / size / max(big - latency[size], 1e-9)
    return {"bandwidth": bandwidth, "latency": latency}


def _timed_all_to_all(group: CommGroup, world: CommGroup, nbytes: int, device: torch.device) -> float:
    """The slowest rank's best-of-REPS time of one all-to-all of `nbytes` in `group` (after a warm-up)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    out = torch.empty_like(buf)
    group.all_to_all_single(out, buf)  # warm-up (connects the group)
    best = float("inf")
    for _ in range(REPS):
        _sync(device)
        start = time.perf_counter()
        group.all_to_all_single(out, buf)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    elapsed = torch.tensor([best], dtype=torch.float64, device=device)
    return float(world.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)[0])


def _random_row(n: int, vocab: int, g: torch.Generator, device: torch.device) -> Batch:
    tokens = torch.randint(0, vocab, (1, n + 1), generator=g)
    return Batch.text(tokens[:, :-1].to(device), tokens[:, 1:].to(device), torch.arange(n).unsqueeze(0).to(device),
                      torch.zeros(1, n, dtype=torch.int64, device=device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_cost(cfg: Config, step: Callable[[Batch], None], model: nn.Module, groups: dict[int, CommGroup],
                  world: CommGroup, device: torch.device) -> dict[str, object]:
    """Measure the coefficients (see the module docstring); the gradients the timed steps left are dropped."""
    lengths = calibration_lengths(cfg.data.max_len)
    times = time_compute(step, cfg.model.vocab_size, lengths, device, world)
    for param in model.parameters():
        param.grad = None
    alpha1, alpha2, beta = fit_compute(lengths, times)
    links = time_all_to_all(groups, world, device)
    return {"alpha1": alpha1, "alpha2": alpha2, "beta": beta,
            "bandwidth": {str(s): b for s, b in links["bandwidth"].items()},
            "latency": {str(s): t for s, t in links["latency"].items()}, "lengths": lengths, "seconds": times}


def resolve_cost_model(cfg: Config, step: Callable[[Batch], None], model: nn.Module, groups: dict[int, CommGroup],
                       world: CommGroup, device: torch.device, element_bytes: int) -> CostModel:
    """The config's coefficients where given, else cached or measured ones (every rank must call this)."""
    c = cfg.parallel.adaptive.cost
    if c.alpha1 and c.alpha2 and c.beta and c.bandwidth_gbps:
        return cost_model(cfg, {}, element_bytes, world.size)  # all given: nothing to measure
    path = cache_path(cfg, world.size, torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    cached = read_cache(path) if world.rank == 0 else None
    have = world.broadcast(torch.tensor([int(cached is not None)], device=device), src=0)
    if int(have[0]):
        values = cached or {}
    else:
        start = time.perf_counter()
        values = measured_cost(cfg, step, model, groups, world, device)
        if world.rank == 0:
            _write_cache(path, values)
            print(f"meshweave: measured the adaptive planner's cost model in {time.perf_counter() - start:.1f} s "
                  f"(cached in {path}; set parallel.adaptive.cost to skip)", flush=True)
    return cost_model(cfg, values, element_bytes, world.size)


def cost_model(cfg: Config, measured: dict[str, object], element_bytes: int, n_ranks: int) -> CostModel:
    """Config overrides on top of measured coefficients."""
    c = cfg.parallel.adaptive.cost
    bandwidth = {int(s): float(b) for s, b in (measured.get("bandwidth") or {}).items()}
    sizes = [1 << i for i in range(1, n_ranks.bit_length()) if (1 << i) <= n_ranks]
    if c.bandwidth_gbps:
        bandwidth = {s: c.bandwidth_gbps * 1e9 for s in sizes}
    latency = [float(t) for t in (measured.get("latency") or {}).values()]
    return CostModel(alpha1=c.alpha1 or float(measured.get("alpha1", 0.0)),
                     alpha2=c.alpha2 or float(measured.get("alpha2", 0.0)),
                     beta=c.beta or float(measured.get("beta", 0.0)),
                     comm_bytes_per_token=comm_bytes_per_token(cfg, element_bytes),
                     bandwidth=bandwidth,
                     latency_per_sequence=collectives_per_sequence(cfg) * (max(latency) if latency else 0.0))


def read_cache(path: Path) -> dict[str, object] | None:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) and {"alpha1", "alpha2", "beta", "bandwidth", "latency"} <= set(values) else None


def _write_cache(path: Path, values: dict[str, object]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values, indent=1))
    except OSError:
        pass  # a cache that cannot be written only means measuring again next time
