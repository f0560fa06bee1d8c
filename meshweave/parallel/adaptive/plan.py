"""A step's plan: which aligned group of ranks runs which sequences in which micro-batch, and its wire format.

The runtime solves on rank 0, broadcasts `StepPlan.encode()` as one int64 tensor and decodes it everywhere;
`digest()` lets ranks check that they hold the same plan. Times travel as integer nanoseconds, and the plan
keeps its times rounded to whole nanoseconds from the start, so decode(encode(p)) == p exactly.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from meshweave.parallel.adaptive.cost import CostModel, rank_tokens
from meshweave.parallel.adaptive.groups import buddy_layout, is_aligned_cover, is_power_of_two

FORMAT_VERSION = 1

# A group before it has a place among the ranks: (size, sequence indices).
Draft = tuple[int, tuple[int, ...]]


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def _seconds(ns: int) -> float:
    return ns / 1e9


@dataclass(frozen=True)
class GroupAssignment:
    start: int                    # first rank index in [0, N); start % size == 0
    size: int                     # power of two
    sequences: tuple[int, ...]    # indices into the step's `lengths`, never empty

    def __contains__(self, rank: int) -> bool:
        return self.start <= rank < self.start + self.size


@dataclass(frozen=True)
class MicroBatchPlan:
    groups: tuple[GroupAssignment, ...]  # aligned blocks covering every rank 0..N-1 exactly once, sorted by start
    predicted_s: float                   # makespan of this micro-batch under the cost model

    def __post_init__(self) -> None:
        object.__setattr__(self, "predicted_s", _seconds(_ns(self.predicted_s)))


@dataclass(frozen=True)
class StepPlan:
    n_ranks: int
    microbatches: tuple[MicroBatchPlan, ...]
    solver: str        # "milp", "milp-timeout" (best incumbent), "greedy-fallback", "greedy", "static-<s>", "megatron"
    solve_s: float     # wall time of planning

    def __post_init__(self) -> None:
        object.__setattr__(self, "solve_s", _seconds(_ns(self.solve_s)))

    @property
    def predicted_s(self) -> float:
        """Predicted step time: the sum of the micro-batches' makespans (they run one after another)."""
        return sum(mb.predicted_s for mb in self.microbatches)

    def group_of(self, micro: int, rank: int) -> GroupAssignment:
        """The group `rank` belongs to in micro-batch `micro`."""
        for g in self.microbatches[micro].groups:
            if rank in g:
                return g
        raise ValueError(f"rank {rank} is in no group of micro-batch {micro} (plan for {self.n_ranks} ranks)")

    def encode(self, *, with_solve_time: bool = True) -> list[int]:
        """Flat ints: version, n_ranks, solve ns, solver (length, chars), micro-batches (ns, groups (start, size,
        n, indices...))."""
        out = [FORMAT_VERSION, self.n_ranks, _ns(self.solve_s) if with_solve_time else 0,
               len(self.solver), *(ord(c) for c in self.solver), len(self.microbatches)]
        for mb in self.microbatches:
            out += [_ns(mb.predicted_s), len(mb.groups)]
            for g in mb.groups:
                out += [g.start, g.size, len(g.sequences), *g.sequences]
        return out

    @classmethod
    def decode(cls, data: Sequence[int]) -> StepPlan:
        """Inverse of `encode`; a malformed buffer raises ValueError."""
        reader = _Reader([int(x) for x in data])
        version = reader.take()
        if version != FORMAT_VERSION:
            raise ValueError(f"adaptive plan encoding version {version}, expected {FORMAT_VERSION}")
        n_ranks, solve_ns = reader.take(), reader.take()
        solver = "".join(chr(c) for c in reader.take_list())
        micro = []
        for _ in range(reader.take()):
            predicted_ns, n_groups = reader.take(), reader.take()
            groups = []
            for _ in range(n_groups):
                start, size = reader.take(), reader.take()
                groups.append(GroupAssignment(start, size, tuple(reader.take_list())))
            micro.append(MicroBatchPlan(tuple(groups), _seconds(predicted_ns)))
        reader.finish()
        return cls(n_ranks, tuple(micro), solver, _seconds(solve_ns))

    def digest(self) -> int:
        """Stable 63-bit hash of the encoding, for a cross-rank identity check.

        The solve time is left out: ranks that each solve the same inputs get the same plan but not the same
        wall time.
        """
        code = self.encode(with_solve_time=False)
        raw = b"".join(struct.pack("<q", x) for x in code)
        return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") & ((1 << 63) - 1)


class _Reader:
    def __init__(self, data: list[int]) -> None:
        self.data, self.pos = data, 0

    def take(self) -> int:
        if self.pos >= len(self.data):
            raise ValueError(f"adaptive plan encoding ends early at {self.pos} of {len(self.data)} integers")
        self.pos += 1
        return self.data[self.pos - 1]

    def take_list(self) -> list[int]:
        n = self.take()
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"adaptive plan encoding: a list of {n} integers at {self.pos} overruns the buffer")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise ValueError(f"adaptive plan encoding has {len(self.data) - self.pos} trailing integers")


def draft_makespan(drafts: Sequence[Draft], lengths: Sequence[int], cost: CostModel) -> float:
    """Makespan of one micro-batch's groups: the slowest group's time, β included."""
    return max(cost.group_time([lengths[i] for i in seqs], size) for size, seqs in drafts)


def assemble_microbatch(drafts: Sequence[Draft], lengths: Sequence[int], cost: CostModel,
                        makespan: float | None = None) -> MicroBatchPlan:
    """Place drafted groups on the ranks (largest first, aligned) and price the micro-batch (or take the
    caller's `makespan` of the same drafts under the same cost model).

    Canonical order so equal inputs give equal plans: sequences ascending inside a group; among groups of one
    size, the one whose sequences sort first gets the lower ranks.
    """
    canon = sorted(((size, tuple(sorted(seqs))) for size, seqs in drafts), key=lambda d: (-d[0], d[1]))
    blocks = buddy_layout([size for size, _ in canon])
    groups = tuple(GroupAssignment(start, size, seqs) for (start, size), (_, seqs) in zip(blocks, canon))
    return MicroBatchPlan(groups, draft_makespan(canon, lengths, cost) if makespan is None else makespan)


def validate_plan(plan: StepPlan, lengths: Sequence[int], capacity_tokens: int,
                  max_group: int | None = None) -> None:
    """Raise ValueError unless the plan is legal for these lengths (what the runtime relies on).

    Every micro-batch's groups are aligned power-of-two blocks covering all ranks once, sorted by start, none
    empty and none larger than `max_group`; every sequence is in exactly one group of one micro-batch; no rank
    holds more than `capacity_tokens` tokens (ceil(L/s) per sequence) in a micro-batch.
    """
    seen = [0] * len(lengths)
    for m, mb in enumerate(plan.microbatches):
        check_microbatch(m, mb, plan.n_ranks, lengths, capacity_tokens, max_group)
        for g in mb.groups:
            for i in g.sequences:
                seen[i] += 1
    wrong = [i for i, c in enumerate(seen) if c != 1]
    if wrong:
        raise ValueError(f"sequences {wrong[:8]} are placed {[seen[i] for i in wrong[:8]]} times (want once)")


def check_microbatch(m: int, mb: MicroBatchPlan, n_ranks: int, lengths: Sequence[int], capacity: int,
                     max_group: int | None) -> None:
    """Raise ValueError unless micro-batch `m` is legal on its own (see `validate_plan`)."""
    blocks = [(g.start, g.size) for g in mb.groups]
    if blocks != sorted(blocks) or not is_aligned_cover(blocks, n_ranks):
        raise ValueError(f"micro-batch {m}: groups {blocks} are not sorted aligned blocks covering {n_ranks} ranks")
    for g in mb.groups:
        if not g.sequences:
            raise ValueError(f"micro-batch {m}: group at rank {g.start} of size {g.size} has no sequence")
        if not is_power_of_two(g.size) or (max_group is not None and g.size > max_group):
            raise ValueError(f"micro-batch {m}: group size {g.size} is not a power of two <= {max_group}")
        if any(not 0 <= i < len(lengths) for i in g.sequences):
            raise ValueError(f"micro-batch {m}: group at rank {g.start} names a sequence out of range")
        held = sum(rank_tokens(lengths[i], g.size) for i in g.sequences)
        if held > capacity:
            raise ValueError(f"micro-batch {m}: group at rank {g.start} of size {g.size} holds {held} tokens per "
                             f"rank > capacity {capacity}")
