"""DSP (dynamic sequence parallelism, Zhao et al. 2024) for models whose blocks each attend over one dim of
multi-dimensional activations (B, T, S, ..., C): spatial-temporal video transformers.

Instead of splitting one sequence dim and communicating inside every attention (Ulysses, ring), DSP keeps the
activations sharded on a dim the next block does *not* attend over, so attention, MLP and norms run locally,
and switches the sharded dim with one all-to-all (dsp_comm.reshard) only when a block needs the current one
whole. No constraint on the number of heads; dims that do not divide by P are zero-padded and trimmed.

`plan_sharded_dims` picks, block by block, the dim to shard: the fewest switches for the model's block order
(a shortest path over blocks x candidate dims), ties broken by the least padding. Candidates are the sequence
dims (1..k) that a block does not attend over and that have more than one value; a dim of size 1 counts as
attended by nobody. When some block has no such dim (images: T = 1 and a spatial block), the batch dim is a
candidate for every block instead, which for images means sharding the batch throughout with no switch.

Entry (`enter`) takes this rank's chunk of the whole activations without communicating; the model computes its
loss on its own part (`exit` trims the padding and says where the part starts), so there is no gather at exit
either: the per-step traffic is exactly one all-to-all per switch forward and one backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from meshweave.attention.dsp_comm import chunk_length, reshard, take_chunk
from meshweave.core.comm import CommGroup

BATCH = 0


def _candidates(sizes: Sequence[int], attends: int | None, parts: int, batch_ok: bool) -> list[int]:
    dims = [d for d in range(1, len(sizes)) if d != attends and sizes[d] > 1]
    return ([BATCH] + dims) if batch_ok else dims


@lru_cache(maxsize=256)
def plan_sharded_dims(sizes: tuple[int, ...], attends: tuple[int | None, ...], parts: int) -> tuple[int, ...]:
    """The activation dim to shard during each block: fewest switches, then least padding, then lowest dim.

    sizes: the whole sizes of dims (B, D1, ..., Dk) (channels excluded); attends[i]: the dim block i attends over
    (None: none). Pure arithmetic on host integers."""
    plain = [_candidates(sizes, a if a is None or sizes[a] > 1 else None, parts, False) for a in attends]
    batch_ok = any(not c for c in plain)
    cands = [_candidates(sizes, a if a is None or sizes[a] > 1 else None, parts, batch_ok) for a in attends]
    if any(not c for c in cands):
        raise ValueError(f"no dim of activations {sizes} can be sharded for blocks attending over {attends}")
    waste = lambda d: chunk_length(sizes[d], parts) * parts - sizes[d]
    # cost[d] = (switches, padding, path) of the best plan for blocks 0..i ending sharded on d
    best = {d: (0, waste(d), (d,)) for d in cands[0]}
    for dims in cands[1:]:
        best = {d: min((sw + (prev != d), pad + waste(d), path + (d,)) for prev, (sw, pad, path) in best.items())
                for d in dims}
    return min(best.values())[2]


def plan_switches(sizes: tuple[int, ...], attends: tuple[int | None, ...], parts: int) -> int:
    """All-to-alls per forward under the plan (the same number again in backward)."""
    plan = plan_sharded_dims(sizes, attends, parts)
    return sum(a != b for a, b in zip(plan, plan[1:]))


class DynamicSequenceParallel:
    """The LayoutOp of models/layout_api.py under DSP over `group` (see the module doc)."""

    def __init__(self, group: CommGroup) -> None:
        self.group = group

    def _plan(self, sizes: Sequence[int], attends: Sequence[int | None]) -> tuple[int, ...]:
        return plan_sharded_dims(tuple(int(s) for s in sizes), tuple(attends), self.group.size)

    def enter(self, x: torch.Tensor, attends: Sequence[int | None]) -> torch.Tensor:
        """This rank's chunk of the whole activations x for block 0 (no communication)."""
        if self.group.size == 1:
            return x
        dim = self._plan(x.shape[:-1], attends)[0]
        return take_chunk(x, dim, self.group.size, self.group.rank)

    def before_block(self, x: torch.Tensor, sizes: Sequence[int], attends: Sequence[int | None], i: int) -> torch.Tensor:
        """x laid out for block i-1 -> for block i: one all-to-all if the sharded dim changes, else x."""
        if self.group.size == 1 or i == 0:
            return x
        plan = self._plan(sizes, attends)
        before, now = plan[i - 1], plan[i]
        if before == now:
            return x
        return reshard(x, self.group, now, before, int(sizes[now]), int(sizes[before]))

    def samples(self, c: torch.Tensor, sizes: Sequence[int], attends: Sequence[int | None], i: int) -> torch.Tensor:
        """Per-sample values for block i: this rank's batch chunk when the batch is sharded, else all of them."""
        if self.group.size == 1 or self._plan(sizes, attends)[i] != BATCH:
            return c
        return take_chunk(c, 0, self.group.size, self.group.rank)

    def start(self, sizes: Sequence[int], attends: Sequence[int | None], i: int, dim: int) -> int:
        """Where this rank's part of `dim` starts during block i (0 unless `dim` is the sharded one)."""
        if self.group.size == 1 or self._plan(sizes, attends)[i] != dim:
            return 0
        return self.group.rank * chunk_length(int(sizes[dim]), self.group.size)

    def exit(self, x: torch.Tensor, sizes: Sequence[int], attends: Sequence[int | None]) -> tuple[torch.Tensor, tuple[int, ...]]:
        """This rank's real values (padding trimmed) and where they start in each dim (no communication)."""
        starts = [0] * len(sizes)
        if self.group.size == 1:
            return x, tuple(starts)
        dim = self._plan(sizes, attends)[-1]
        c = chunk_length(int(sizes[dim]), self.group.size)
        starts[dim] = min(self.group.rank * c, int(sizes[dim]))
        real = max(0, min(c, int(sizes[dim]) - starts[dim]))
        return x.narrow(dim, 0, real), tuple(starts)
