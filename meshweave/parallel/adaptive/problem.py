"""One step's planning problem, checked once and priced once for the planners' loops.

`Problem.build` rejects what no plan can satisfy with a one-line ValueError that names the fix: a sequence
longer than the largest allowed group can hold, or fewer sequences than the micro-batch needs groups (every
rank must compute in every micro-batch, so N / max_size groups need a sequence each).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from meshweave.parallel.adaptive.cost import CostModel, min_group_size, rank_tokens
from meshweave.parallel.adaptive.groups import candidate_sizes


@dataclass(frozen=True)
class Problem:
    lengths: tuple[int, ...]
    n_ranks: int
    sizes: tuple[int, ...]                    # candidate group sizes, ascending
    capacity: int                             # tokens per rank per micro-batch
    cost: CostModel
    min_size: tuple[int, ...]                 # per sequence: smallest power-of-two group that holds it
    times: dict[int, tuple[float, ...]]       # size -> per-sequence seconds on a group of that size (no β)
    tokens: dict[int, tuple[int, ...]]        # size -> per-sequence tokens per rank, ceil(L / s)
    best_time: tuple[float, ...]              # per sequence: least seconds on any allowed group
    best_work: tuple[float, ...]              # per sequence: least rank-seconds (s · t) on any allowed group

    @classmethod
    def build(cls, lengths: Sequence[int], n_ranks: int, cost: CostModel, capacity_tokens: int,
              max_group: int | None = None) -> Problem:
        lengths = tuple(int(x) for x in lengths)
        if not lengths:
            raise ValueError("adaptive plan: the step has no sequences")
        if min(lengths) < 1:
            raise ValueError(f"adaptive plan: sequence lengths must be >= 1, got {min(lengths)}")
        if capacity_tokens < 1:
            raise ValueError(f"adaptive plan: capacity_tokens must be >= 1, got {capacity_tokens}")
        sizes = candidate_sizes(n_ranks, max_group)
        _check_fits(lengths, n_ranks, sizes[-1], capacity_tokens)
        _check_enough_sequences(len(lengths), n_ranks, sizes[-1])
        min_size = tuple(min_group_size(x, capacity_tokens) for x in lengths)
        table = np.stack([cost.seq_times(lengths, s) for s in sizes])            # sizes x sequences
        allowed = np.asarray(sizes)[:, None] >= np.asarray(min_size)[None, :]
        best_time = np.where(allowed, table, np.inf).min(axis=0)
        best_work = np.where(allowed, table * np.asarray(sizes, dtype=np.float64)[:, None], np.inf).min(axis=0)
        times = {s: tuple(row.tolist()) for s, row in zip(sizes, table)}
        ls = np.asarray(lengths, dtype=np.int64)
        tokens = {s: tuple((-(-ls // s)).tolist()) for s in sizes}
        return cls(lengths, n_ranks, sizes, capacity_tokens, cost, min_size, times, tokens, tuple(best_time.tolist()),
                   tuple(best_work.tolist()))

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    @property
    def min_groups(self) -> int:
        """Groups (so sequences) a micro-batch needs at least: N / largest size."""
        return self.n_ranks // self.max_size

    def need(self, i: int, size: int) -> int:
        """Tokens per rank sequence i takes on a group of `size`."""
        return self.tokens[size][i]

    def lower_bound(self, chunk: Sequence[int]) -> float:
        """A makespan no plan of these sequences in one micro-batch beats.

        The longest single sequence on its best group, and the rank-seconds bound: every sequence occupies
        s ranks for t(L, s), and every group of the micro-batch pays β, so N·M ≥ N·β + Σ min_s s·t(L, s).
        """
        longest = max(self.best_time[i] for i in chunk)
        work = sum(self.best_work[i] for i in chunk)
        return self.cost.beta + max(longest, work / self.n_ranks)


def _check_fits(lengths: tuple[int, ...], n_ranks: int, max_size: int, capacity: int) -> None:
    longest = max(lengths)
    if rank_tokens(longest, max_size) > capacity:
        limit = "all" if max_size == n_ranks else f"the largest allowed group of {max_size} of the"
        raise ValueError(f"adaptive plan: a sequence of {longest} tokens does not fit on {limit} {n_ranks} ranks "
                         f"at {capacity} tokens per rank; lower data.max_len to <= {max_size * capacity}, or use "
                         f"more ranks (or raise the memory per rank)")


def _check_enough_sequences(n: int, n_ranks: int, max_size: int) -> None:
    if n * max_size < n_ranks:
        raise ValueError(f"adaptive plan: {n} sequences cannot keep {n_ranks} ranks busy in groups of at most "
                         f"{max_size} ranks (needs {n_ranks // max_size}); raise data.tokens_per_step or use "
                         f"fewer ranks")
