"""DeepSpeed-Ulysses as a generic runtime applies it to a factorised (spatial/temporal) model: `sp_method: ulysses`
on st_dit, the baseline the DSP paper and issue 11 measure DSP against.

A generic runtime sees a sequence of tokens: the activations (B, T, S, C) are the T-major sequence of T*S tokens,
cut into P contiguous shards of c = ceil(T*S / P) tokens (the last ones zero-padded). Every attention, spatial
and temporal alike, all-to-alls q, k and v from token shards to head shards over the whole sequence
(dsp_comm.reshard: tokens gathered and trimmed to T*S, heads scattered), attends with its block's factorised
pattern (over the S patches of each frame, or the T frames of each patch) and all-to-alls the output back:
4 all-to-alls forward and 4 backward per attention, each of B * c * P * ceil(H/P) * D/H values. Over L
spatial+temporal pairs that is 16L all-to-alls of about the activations' size / P per step, against DSP's
2(2L-1) (one per switch each way): DSP moves (2L-1)/(8L) < 1/4 of these bytes.

Heads that do not divide by P are zero-padded (the padded heads attend to zeros and return zeros) rather than
refused: the baseline then runs on every layout DSP runs on (st_dit puts no head constraint on sp), and the
padding it sends is counted in its byte formula. The byte ratio is asserted on layouts whose heads divide.

The layout (LayoutOp of models/layout_api.py) holds a shard as (B, 1, c, C): one row of c consecutive tokens of
the row-major (T, S) grid, starting at flat token r * c, which `start` reports as dim 2's start (st_dit reads its
positions and its loss target by that rule, see models/st_dit/model.py). Nothing moves between blocks.

The attention ops need the grid's (B, T, S), which the shapes of q, k, v do not carry (a shard is c tokens of
any frames), so the layout records the whole sizes on entry and the ops read them. Every forward of a batch
passes through `enter` before its attention runs; a block recomputed under activation checkpointing runs on
the same batch, whose sizes are still those recorded. The ops check that q holds B * c tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meshweave.attention.dsp_comm import chunk_length, reshard, take_chunk
from meshweave.core.comm import CommGroup
from meshweave.models.attention_api import AttentionMeta, AttentionOp, local_attention

SEQ, HEADS = 1, 2  # dims of q/k/v (B, N, H, D)
FRAMES, PATCHES = 1, 2  # dims of the (B, T, S) token grid
# The grid dim that a slot of each kind attends over: spatial = the patches of a frame, temporal = the frames of
# a patch (the slot kinds st_dit declares).
GRID_DIM_OF_KIND = {"spatial": PATCHES, "temporal": FRAMES}


class FlattenedUlysses:
    """The LayoutOp (flattened token shards) and, from `attention(kind)`, the attention ops of generic Ulysses over
    `group` (see the module doc)."""

    def __init__(self, group: CommGroup) -> None:
        self.group = group
        self.sizes: tuple[int, int, int] | None = None  # (B, T, S) of the batch in flight, recorded by `enter`

    def _chunk(self, sizes: Sequence[int]) -> int:
        return chunk_length(int(sizes[FRAMES]) * int(sizes[PATCHES]), self.group.size)

    def enter(self, x: torch.Tensor, attends: Sequence[int | None]) -> torch.Tensor:
        """Records (B, T, S); returns this rank's c tokens of the flattened sequence as (B, 1, c, C) (no comm)."""
        self.sizes = (int(x.shape[0]), int(x.shape[FRAMES]), int(x.shape[PATCHES]))
        if self.group.size == 1:
            return x
        return take_chunk(x.flatten(FRAMES, PATCHES), SEQ, self.group.size, self.group.rank).unsqueeze(FRAMES)

    def before_block(self, x: torch.Tensor, sizes: Sequence[int], attends: Sequence[int | None], i: int) -> torch.Tensor:
        return x  # the shard never changes: Ulysses communicates inside attention

    def samples(self, c: torch.Tensor, sizes: Sequence[int], attends: Sequence[int | None], i: int) -> torch.Tensor:
        return c

    def start(self, sizes: Sequence[int], attends: Sequence[int | None], i: int, dim: int) -> int:
        """The shard's first flat token as the start of dim 2 (row-major rule); 0 for the others."""
        return self.group.rank * self._chunk(sizes) if dim == PATCHES and self.group.size > 1 else 0

    def exit(self, x: torch.Tensor, sizes: Sequence[int], attends: Sequence[int | None]) -> tuple[torch.Tensor, tuple[int, ...]]:
        """This rank's real tokens (padding trimmed) and where they start (no communication)."""
        if self.group.size == 1:
            return x, (0,) * len(sizes)
        c, total = self._chunk(sizes), int(sizes[FRAMES]) * int(sizes[PATCHES])
        first = min(self.group.rank * c, total)
        return x.narrow(PATCHES, 0, min(c, total - first)), (0, 0, first)

    def attention(self, kind: str) -> AttentionOp:
        """The op for attention slots of `kind` ("spatial" or "temporal"): 4 all-to-alls forward, 4 backward."""
        if kind not in GRID_DIM_OF_KIND:
            raise ValueError(f"ulysses over flattened tokens knows slot kinds {sorted(GRID_DIM_OF_KIND)}, not {kind!r}")
        dim = GRID_DIM_OF_KIND[kind]

        def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
            return self._attend(q, k, v, meta, dim)

        return op

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta, dim: int) -> torch.Tensor:
        if self.group.size == 1:
            return local_attention(q, k, v, meta)
        if self.sizes is None:
            raise RuntimeError("ulysses over flattened tokens: attention ran before the layout's enter() recorded "
                               "the token grid")
        b, t, s = self.sizes
        c, heads, shape = self._chunk(self.sizes), q.shape[HEADS], q.shape
        if shape[0] * shape[1] != b * c:
            raise RuntimeError(f"ulysses over flattened tokens: q holds {shape[0] * shape[1]} tokens per head, "
                               f"expected this rank's {b} x {c} of a ({b}, {t}, {s}) grid")
        # (B, c, H, D) token shard -> (B, T*S, ceil(H/P), D) head shard of the whole sequence, one all-to-all each
        q, k, v = (reshard(x.reshape(b, c, heads, -1), self.group, HEADS, SEQ, heads, t * s) for x in (q, k, v))
        out = local_attention(*(_group(x, t, s, dim) for x in (q, k, v)), meta)
        return reshard(_ungroup(out, b, t, s, dim), self.group, SEQ, HEADS, t * s, heads).reshape(shape)


def _group(x: torch.Tensor, t: int, s: int, dim: int) -> torch.Tensor:
    """(B, T*S, h, D) -> one sequence per row over the attended grid dim: (B*T, S, h, D) or (B*S, T, h, D)."""
    grid = x.unflatten(SEQ, (t, s))  # (B, T, S, h, D)
    if dim == FRAMES:
        grid = grid.movedim(FRAMES, PATCHES)  # (B, S, T, h, D)
    return grid.flatten(0, 1)


def _ungroup(x: torch.Tensor, b: int, t: int, s: int, dim: int) -> torch.Tensor:
    """The inverse of `_group`: back to (B, T*S, h, D)."""
    grid = x.unflatten(0, (b, -1))
    if dim == FRAMES:
        grid = grid.movedim(PATCHES, FRAMES)
    return grid.flatten(FRAMES, PATCHES)
