"""Sequence Blaster (FlexSP §8.4, `chunk_globalbatch`): split a step's sequences into micro-batches.

Sequences sorted longest first are cut into mb consecutive chunks so that the largest chunk's token sum is
as small as possible (a linear-partition dynamic program). Consecutive chunks of sorted lengths keep long
sequences together, where the MILP can give them big groups, and short ones together, where small groups
need no communication. The fewest micro-batches that can hold the step is ceil(total / (N · capacity));
the planner tries a few counts from there (FlexSP tries 5) and keeps the one with the least Σ makespan.

Each chunk must hold at least `min_count` sequences: every rank computes in every micro-batch, so N ranks
in groups of at most `max_size` need N / max_size sequences. Hand-written: a small DP no library offers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MICROBATCH_TRIES = 5


def fewest_microbatches(total_tokens: int, n_ranks: int, capacity: int) -> int:
    """ceil(total / (N · capacity)): fewer micro-batches cannot hold the step's tokens."""
    return max(1, -(-total_tokens // (n_ranks * capacity)))


def partitions(lengths: Sequence[int], counts: Sequence[int], min_count: int = 1) -> dict[int, list[int]]:
    """Best cut of `lengths` (already in order, longest first) into each of `counts` chunks.

    Returns {mb: chunk sizes} for every feasible mb (each chunk at least `min_count` long), minimising the
    largest chunk's sum. The fast O(mb · n log n) program without the minimum answers whenever its chunks
    happen to meet it (the usual case: only a micro-batch of a few giant sequences can be short); otherwise
    the O(mb · n²) program with the minimum decides.
    """
    n = len(lengths)
    wanted = sorted({c for c in counts if 1 <= c and c * min_count <= n})
    if not wanted:
        return {}
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(lengths, dtype=np.float64))])
    fast = _solve(_fast_layers(prefix, wanted[-1]), n, wanted)
    slow_needed = [c for c in wanted if min(fast[c]) < min_count]
    if slow_needed:
        fast.update(_solve(_full_layers(prefix, slow_needed[-1], min_count), n, slow_needed))
    return {c: sizes for c, sizes in fast.items() if sizes and min(sizes) >= min_count}


def _solve(layers: list[tuple[np.ndarray, np.ndarray]], n: int, wanted: list[int]) -> dict[int, list[int]]:
    out = {}
    for c in wanted:
        if np.isfinite(layers[c - 1][0][n]):
            out[c] = _chunk_sizes([parent for _, parent in layers[:c]], n)
    return out


def _fast_layers(prefix: np.ndarray, depth: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """dp[j][i] = min over k of max(dp[j−1][k], S[i] − S[k]) for chunks of >= 1: dp[j−1] rises with k and
    S[i] − S[k] falls, so the best k sits where they cross, found by one binary search per i."""
    n = len(prefix) - 1
    i = np.arange(n + 1)
    prev = np.where(i == 0, 0.0, np.inf)
    layers = []
    for j in range(1, depth + 1):
        rising = prev[j - 1:] + prefix[j - 1:]
        cross = np.searchsorted(rising, prefix, side="left") + (j - 1)
        hi = np.maximum(i - 1, j - 1)
        k1 = np.clip(cross, j - 1, hi)
        k0 = np.clip(cross - 1, j - 1, hi)
        v0 = np.maximum(prev[k0], prefix - prefix[k0])
        v1 = np.maximum(prev[k1], prefix - prefix[k1])
        parent = np.where(v0 <= v1, k0, k1)
        value = np.where(i >= j, np.minimum(v0, v1), np.inf)
        layers.append((value, parent))
        prev = value
    return layers


def _full_layers(prefix: np.ndarray, depth: int, min_count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The same program over every k, with chunks of at least `min_count` (no longer monotone in k)."""
    n = len(prefix) - 1
    k = np.arange(n + 1)[:, None]
    i = np.arange(n + 1)[None, :]
    chunk_sum = np.where(i - k >= min_count, prefix[None, :] - prefix[:, None], np.inf)
    prev = np.where(np.arange(n + 1) == 0, 0.0, np.inf)
    layers = []
    for _ in range(depth):
        cand = np.maximum(prev[:, None], chunk_sum)
        parent = np.argmin(cand, axis=0)         # ties: the earliest cut
        prev = cand[parent, np.arange(n + 1)]
        layers.append((prev, parent))
    return layers


def _chunk_sizes(parents: list[np.ndarray], n: int) -> list[int]:
    ends, i = [], n
    for parent in reversed(parents):
        start = int(parent[i])
        ends.append(i - start)
        i = start
    return ends[::-1]
