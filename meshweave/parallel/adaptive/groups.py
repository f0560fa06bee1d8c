"""Buddy blocks: which SP group sizes exist and where a micro-batch's groups sit among the ranks.

Groups are aligned power-of-two blocks of consecutive ranks (rank r of a group of size s starting at b is
b + r with b % s == 0), the way FlexSP creates them once at start-up (`gen_sp_group_dist`, consecutive):
two blocks either nest or are disjoint, so the groups of any micro-batch never overlap and the runtime can
build every candidate group ahead of time.

The ranks need not be a power of two: the candidate sizes are then the powers of two that divide N (for
N = 12: 1, 2, 4), so every size still tiles N, and the layout below stays aligned.
"""

from __future__ import annotations

from collections.abc import Sequence


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def candidate_sizes(n_ranks: int, max_group: int | None = None) -> tuple[int, ...]:
    """Group sizes a plan may use, ascending: powers of two (1 included) dividing `n_ranks`, up to `max_group`."""
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be >= 1, got {n_ranks}")
    if max_group is not None and max_group < 1:
        raise ValueError(f"max_group must be >= 1, got {max_group}")
    cap = n_ranks if max_group is None else min(max_group, n_ranks)
    sizes = []
    s = 1
    while s <= cap and n_ranks % s == 0:
        sizes.append(s)
        s *= 2
    return tuple(sizes)


def buddy_layout(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Aligned, non-overlapping (start, size) blocks for a multiset of power-of-two sizes, largest first.

    Placing blocks largest first back to back keeps every start a multiple of its size: the blocks before a
    block of size s all have sizes that are multiples of s. The blocks come back in placement order
    (sizes descending; equal sizes in the order given), covering ranks 0 .. sum(sizes) − 1.
    """
    for s in sizes:
        if not is_power_of_two(s):
            raise ValueError(f"group size {s} is not a power of two")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    blocks, start = [], 0
    for i in order:
        blocks.append((start, sizes[i]))
        start += sizes[i]
    return blocks


def is_aligned_cover(blocks: Sequence[tuple[int, int]], n_ranks: int) -> bool:
    """True if the (start, size) blocks are aligned power-of-two blocks covering 0..n_ranks−1 exactly once."""
    covered = [0] * n_ranks
    for start, size in blocks:
        if not is_power_of_two(size) or start % size or start < 0 or start + size > n_ranks:
            return False
        for r in range(start, start + size):
            covered[r] += 1
    return all(c == 1 for c in covered)
