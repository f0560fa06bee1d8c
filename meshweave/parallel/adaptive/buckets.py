"""Bucketing of sequence lengths (FlexSP §8.4, `bucketing_seqs`): fewer, coarser lengths for the MILP.

The MILP counts sequences per bucket (an integer A[k, p]) instead of deciding each sequence (a binary), so
its size depends on the number of buckets B, not on the number of sequences. Every sequence is priced at
its bucket's boundary (the bucket's longest length), which over-states time and memory; the dynamic program
below picks the B buckets of sorted lengths that waste the fewest padded tokens, Σ(boundary − L).

B starts at 16 (FlexSP) and grows until the padding fits FlexSP's memory rule, Σ boundary ≤ (Σ L + N·cap)/2
(the padding may take at most half of the micro-batch's free memory), and our time rule, padding ≤
`pad_fraction` of the tokens (the objective is time, and a padded token over-prices a sequence at least
linearly), up to `max_buckets` (the solve time grows with B). Hand-written: no library does this 1-D DP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

START_BUCKETS = 16
MAX_BUCKETS = 48
PAD_FRACTION = 0.01


@dataclass(frozen=True)
class Bucket:
    boundary: int                 # the longest length in the bucket; every member is priced at it
    members: tuple[int, ...]      # positions in the input list, longest first (ties: lower position first)


def bucket_lengths(lengths: Sequence[int], memory_tokens: int, *, start: int = START_BUCKETS,
                   max_buckets: int = MAX_BUCKETS, pad_fraction: float = PAD_FRACTION) -> list[Bucket]:
    """Split lengths into buckets, longest bucket first (see the module docstring for the rule).

    `memory_tokens` is the micro-batch's memory, N × capacity tokens. With no more distinct lengths than
    `start` every distinct length gets its own bucket and nothing is padded. Above `ATOMS` distinct lengths
    the program runs on `ATOMS` runs of neighbouring lengths of equal count instead (its cost grows with the
    square of what it splits), which costs a little padding on steps of thousands of sequences.
    """
    values, counts = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    total = int(np.dot(values, counts))
    slack = max(0, memory_tokens - total) / 2
    ends = _atom_ends(counts)
    top = values[ends - 1].astype(np.float64)                      # each atom's longest length
    c = np.concatenate([[0], np.cumsum(counts)])[np.concatenate([[0], ends])].astype(np.float64)
    tokens = np.concatenate([[0], np.cumsum(values * counts)])[np.concatenate([[0], ends])].astype(np.float64)
    d = len(ends)
    cuts = _best_cuts(top, c, tokens, lo=min(start, d), hi=min(max(start, max_buckets), d),
                      allowed_padding=min(slack, pad_fraction * total))
    return _buckets_from_cuts(lengths, [int(top[j - 1]) for j in cuts])


ATOMS = 128


def _atom_ends(counts: np.ndarray) -> np.ndarray:
    """End positions (exclusive) in the distinct lengths of at most ATOMS runs of about equal count."""
    if len(counts) <= ATOMS:
        return np.arange(1, len(counts) + 1)
    cum = np.cumsum(counts)
    marks = np.searchsorted(cum, np.linspace(0, cum[-1], ATOMS + 1)[1:], side="left") + 1
    return np.unique(np.minimum(marks, len(counts)))


def _best_cuts(top: np.ndarray, c: np.ndarray, s: np.ndarray, lo: int, hi: int,
               allowed_padding: float) -> list[int]:
    """End positions (exclusive, in atoms) of the buckets for the smallest B in [lo, hi] within the padding.

    dp[b][j] = least padding of the first j atoms in b buckets; a bucket of atoms k..j−1 pads
    top[j−1]·(c[j] − c[k]) − (s[j] − s[k]) with c, s the prefix counts and token sums.
    """
    d = len(top)
    k = np.arange(d + 1)[:, None]
    j = np.arange(d + 1)[None, :]
    invalid = k >= j                        # a bucket needs at least one atom
    vj = np.concatenate([[0.0], top])[None, :]
    bucket_pad = np.where(invalid, np.inf, vj * (c[None, :] - c[:, None]) - (s[None, :] - s[:, None]))
    prev = np.full(d + 1, np.inf)
    prev[0] = 0.0
    parents: list[np.ndarray] = []
    for b in range(1, hi + 1):
        cand = prev[:, None] + bucket_pad
        parent = np.argmin(cand, axis=0)
        prev = cand[parent, np.arange(d + 1)]
        parents.append(parent)
        if b >= lo and (prev[d] <= allowed_padding or b == hi):
            break
    return _backtrack(parents, d)


def _backtrack(parents: list[np.ndarray], d: int) -> list[int]:
    cuts, j = [], d
    for parent in reversed(parents):
        cuts.append(j)
        j = int(parent[j])
    return sorted(cuts)


def _buckets_from_cuts(lengths: Sequence[int], boundaries: list[int]) -> list[Bucket]:
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    buckets: list[list[int]] = [[] for _ in boundaries]
    b = len(boundaries) - 1                 # walk lengths descending, buckets from the longest boundary down
    for i in order:
        while b > 0 and lengths[i] <= boundaries[b - 1]:
            b -= 1
        buckets[b].append(i)
    return [Bucket(boundaries[b], tuple(buckets[b])) for b in reversed(range(len(boundaries))) if buckets[b]]
