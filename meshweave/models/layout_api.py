"""The seam where a multi-dimensional model's activations are laid out between blocks (DSP plugs in here).

A model whose blocks each attend over one dimension of its (B, D1, D2, ..., C) activations (a video
transformer: spatial blocks over the patches of a frame, temporal blocks over the frames of a patch) holds
one `LayoutSlot`, built with the dim each block attends over, and calls it at three points:

    x = layout.enter(x)                   # full activations -> this rank's part, laid out for block 0
    x = layout.before_block(x, sizes, i)  # laid out for block i-1 -> laid out for block i
    c = layout.samples(c, sizes, i)       # per-sample values (B, ...) for block i (its part of B, if B is sharded)
    start = layout.start(sizes, i, dim)   # where this rank's part of `dim` starts during block i (positions)
    part, starts = layout.exit(x, sizes)  # this rank's real (unpadded) part and where it starts in each dim

`sizes` are the full sizes of the activation dims (known to the model from its input). The slot's op starts
as the single-process identity; dynamic sequence parallelism (attention/dsp.py) replaces it with one that
shards a dim the next block does not attend over and switches dims with one all-to-all when a block needs
it, so the dim a block attends over is whole; an embedded method (Ulysses on one fixed sharded dim) leaves
it sharded and communicates inside the attention slot instead, and the block reads `start` to encode the
global positions of its part. Models never import attention/ or parallel/.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn as nn


class LayoutOp(Protocol):
    def enter(self, x: torch.Tensor, attends: Sequence[int]) -> torch.Tensor: ...

    def before_block(self, x: torch.Tensor, sizes: Sequence[int], attends: Sequence[int], i: int) -> torch.Tensor: ...

    def samples(self, c: torch.Tensor, sizes: Sequence[int], attends: Sequence[int], i: int) -> torch.Tensor: ...

    def start(self, sizes: Sequence[int], attends: Sequence[int], i: int, dim: int) -> int: ...

    def exit(self, x: torch.Tensor, sizes: Sequence[int], attends: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]: ...


class LocalLayout:
    """One process: the activations stay whole."""

    def enter(self, x: torch.Tensor, attends: Sequence[int]) -> torch.Tensor:
        return x

    def before_block(self, x: torch.Tensor, sizes: Sequence[int], attends: Sequence[int], i: int) -> torch.Tensor:
        return x

    def samples(self, c: torch.Tensor, sizes: Sequence[int], attends: Sequence[int], i: int) -> torch.Tensor:
        return c

    def start(self, sizes: Sequence[int], attends: Sequence[int], i: int, dim: int) -> int:
        return 0

    def exit(self, x: torch.Tensor, sizes: Sequence[int], attends: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
        return x, (0,) * len(sizes)


class LayoutSlot(nn.Module):
    """Holds no parameters; `attends[i]` is the activation dim block i attends over (None: none)."""

    def __init__(self, attends: Sequence[int | None]) -> None:
        super().__init__()
        self.attends = tuple(attends)
        self.op: LayoutOp = LocalLayout()

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        return self.op.enter(x, self.attends)

    def before_block(self, x: torch.Tensor, sizes: Sequence[int], i: int) -> torch.Tensor:
        return self.op.before_block(x, sizes, self.attends, i)

    def samples(self, c: torch.Tensor, sizes: Sequence[int], i: int) -> torch.Tensor:
        return self.op.samples(c, sizes, self.attends, i)

    def start(self, sizes: Sequence[int], i: int, dim: int) -> int:
        return self.op.start(sizes, self.attends, i, dim)

    def exit(self, x: torch.Tensor, sizes: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
        return self.op.exit(x, sizes, self.attends)

    def extra_repr(self) -> str:
        return f"attends={self.attends}, op={type(self.op).__name__}"


def layout_slots(model: nn.Module) -> list[LayoutSlot]:
    return [m for m in model.modules() if isinstance(m, LayoutSlot)]
