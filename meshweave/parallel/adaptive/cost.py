"""The adaptive planner's cost model (FlexSP §8.2): seconds and bytes of one sequence on one SP group.

A sequence of L tokens on an aligned group of s ranks (Ulysses inside the group) costs each member
- compute (α₁·L² + α₂·L) / s: the attention term is quadratic, the rest linear, both split over s;
- all-to-all comm_bytes_per_token · L · (s−1)/s / s bytes over bandwidth[s] bytes/s: each rank holds L/s
  tokens and sends the (s−1)/s of them that other ranks need, summed over layers and fwd+bwd (0 at s = 1);
and every group pays β once per micro-batch (launch, the sharded model's per-micro-batch gathers).

The numbers come from the runtime's calibration (parallel/adaptive_calibrate.py) or from the FlexSP paper's
fitted values (`flexsp_gpt7b`), which the benchmark uses for its labelled projections. Pure arithmetic: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# FlexSP §8.2 (Hetu-Galvatron `flexSPCostModel`): measured per-size all-to-all bandwidth, "GB/s", 2 IB NICs per
# node, 8 GPUs per node (note the cliff past one node). The paper divides bytes by 2**20 and this number to get
# milliseconds, so one unit is 2**20 bytes per millisecond.
FLEXSP_BANDWIDTH_UNITS = {2: 119.5, 4: 104.1, 8: 96.5, 16: 10.33, 32: 5.94, 64: 4.87}
FLEXSP_UNIT_BYTES_PER_S = 2 ** 20 * 1e3


@dataclass(frozen=True)
class CostModel:
    """Seconds and bytes of sequences on SP groups; see the module docstring for the formulas.

    `bandwidth` maps a group size to its all-to-all bandwidth in bytes/s. A size missing from it takes the
    bandwidth of the largest listed size below it (beyond the largest profiled group the per-rank NIC bound
    stays), and a size with nothing below it is an error once communication is needed (s > 1, bytes > 0).
    """

    alpha1: float                      # seconds per token² (attention), before the split over s
    alpha2: float                      # seconds per token (everything linear), before the split over s
    beta: float                        # seconds per group per micro-batch
    comm_bytes_per_token: float        # bytes one token moves through the all-to-alls, all layers, fwd+bwd
    bandwidth: Mapping[int, float] = field(default_factory=dict)  # group size -> bytes/s
    # Fixed seconds of the collectives one sequence runs on a group of s > 1 (all-to-alls per layer, fwd+bwd,
    # times one's latency): what small messages cost beyond bandwidth. FlexSP's model has no such term; on a
    # latency-bound link (gloo on CPU) without it every group size looked alike to the planner.
    latency_per_sequence: float = 0.0

    def __post_init__(self) -> None:
        for name in ("alpha1", "alpha2", "beta", "comm_bytes_per_token", "latency_per_sequence"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"CostModel.{name} must be a finite number >= 0, got {value!r}")
        for size, bw in self.bandwidth.items():
            if not (math.isfinite(bw) and bw > 0):
                raise ValueError(f"CostModel.bandwidth[{size}] must be a positive number of bytes/s, got {bw!r}")

    def bandwidth_at(self, size: int) -> float:
        """All-to-all bandwidth (bytes/s) inside a group of `size` ranks (nearest profiled size at or below)."""
        below = [s for s in self.bandwidth if s <= size]
        if not below:
            raise ValueError(f"CostModel.bandwidth has no entry for groups of {size} ranks or fewer "
                             f"(has {sorted(self.bandwidth)}); profile or set it")
        return float(self.bandwidth[max(below)])

    def comm_time(self, length: int, size: int) -> float:
        """All-to-all seconds of one sequence of `length` tokens on a group of `size` ranks (0 at size 1)."""
        if size == 1:
            return 0.0
        if self.comm_bytes_per_token == 0:
            return self.latency_per_sequence
        sent = self.comm_bytes_per_token * length * (size - 1) / size / size
        return sent / self.bandwidth_at(size) + self.latency_per_sequence

    def compute_time(self, length: int, size: int) -> float:
        """Compute seconds of one sequence on each member of a group of `size` ranks."""
        return (self.alpha1 * length * length + self.alpha2 * length) / size

    def seq_time(self, length: int, size: int) -> float:
        """Seconds one sequence adds to its group's micro-batch (compute + all-to-all, no β)."""
        return self.compute_time(length, size) + self.comm_time(length, size)

    def seq_times(self, lengths: Sequence[int] | np.ndarray, size: int) -> np.ndarray:
        """`seq_time` of many lengths at once (float64, same order), for the planners' inner loops."""
        ls = np.asarray(lengths, dtype=np.float64)
        t = (self.alpha1 * ls * ls + self.alpha2 * ls) / size
        if size > 1 and self.comm_bytes_per_token:
            t = t + self.comm_bytes_per_token * ls * (size - 1) / size / size / self.bandwidth_at(size)
        if size > 1:
            t = t + self.latency_per_sequence
        return t

    def group_time(self, lengths: Sequence[int], size: int) -> float:
        """Seconds a group of `size` ranks spends on its sequences in one micro-batch, β included."""
        return float(self.seq_times(lengths, size).sum()) + self.beta

    @classmethod
    def flexsp_gpt7b(cls) -> CostModel:
        """The FlexSP paper's fitted GPT-7B model (§8.2; A100s, 8 per node, 2 IB NICs) — for projections only.

        α₁ = 5.128e-6 ms/token², α₂ = 0.18396 ms/token, β = 629.36 ms; the all-to-all moves 4 all-to-alls ×
        fwd+bwd × 32 layers × hidden 4096 × 2 bytes (bf16) per token. Our comm term adds the (s−1)/s factor of
        data that actually leaves a rank, which the paper's formula leaves inside its measured bandwidth.
        """
        return cls(alpha1=5.128e-9, alpha2=1.8396e-4, beta=0.62936,
                   comm_bytes_per_token=4 * 2 * 32 * 4096 * 2,
                   bandwidth={s: bw * FLEXSP_UNIT_BYTES_PER_S for s, bw in FLEXSP_BANDWIDTH_UNITS.items()})


def capacity_tokens(memory_bytes: float, n_params: float, n_ranks: int, activation_bytes_per_token: float) -> int:
    """Tokens one rank can hold in a micro-batch: (memory − model states) / activation bytes per token (§8.2).

    Model states are 16 bytes per parameter (bf16 weights and grads, fp32 master and Adam moments) sharded
    over all ranks (ZeRO-3 / FSDP2), which is what lets any regrouping be legal.
    """
    free = memory_bytes - 16.0 * n_params / n_ranks
    if free <= activation_bytes_per_token:
        raise ValueError(f"model states ({16.0 * n_params / n_ranks / 2**30:.1f} GiB per rank) leave no room for "
                         f"activations in {memory_bytes / 2**30:.1f} GiB; use more ranks or a smaller model")
    return int(free // activation_bytes_per_token)


def flexsp_gpt7b_capacity(n_ranks: int, memory_bytes: float = 80e9) -> int:
    """Token capacity per rank for the paper's 7B model (4.48 MiB of activations per token) on 80 GB GPUs."""
    return capacity_tokens(memory_bytes, 7e9, n_ranks, 4.48 * 2 ** 20)


def rank_tokens(length: int, size: int) -> int:
    """Tokens one member of a group of `size` ranks holds for a sequence (its padded shard, ceil(L/s))."""
    return -(-length // size)


def min_group_size(length: int, capacity: int) -> int:
    """Smallest power-of-two group whose members each hold at most `capacity` tokens of the sequence.

    2^ceil(log2(ceil(L/capacity))) — FlexSP's minSP, and Megatron's `gpus_needed` for max_seqlen_per_rank.
    """
    need = -(-length // capacity)
    return 1 << (need - 1).bit_length()
